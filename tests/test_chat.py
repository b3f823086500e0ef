"""The chat format: render/parse, token masks, response parsing, tokenizer extension, vocab growth."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.transformer import forward, init_model
from model.vocab import grow_vocab
from posttrain import chat
from tests.conftest import small_config
from train.tokenizer import HFTokenizer, SentencePieceTokenizer, train_sentencepiece

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": chat.assistant_content("2 plus 3 is 5.", "5")},
    {"role": "user", "content": "And times 4?\nShow it."},
    {"role": "assistant", "content": chat.assistant_content("5 * 4 = 20", " It is 20. ")},
]

SAMPLE = [
    "The quick brown fox jumps over the lazy dog. What is 2 + 3? It is 5.",
    "A conversation between a user and an assistant, who thinks before answering.",
    "Numbers: 12 345 6789; symbols: <, >, |, /, and some unicode: café, naïve.",
    "def f(x):\n    return x * 4\n",
] * 20

PROBES = ["The quick brown fox", "What is 2 + 3?", "def f(x):\n    return x", "café <think",
          "a|b</end>", "unseen words entirely", "<|user|", "12345 67 8"]


class CharTokenizer:
  """One id per character (ids 10..) plus the chat specials: decoding is exact."""

  bos_id, eos_id, pad_id = 1, 2, 0

  def __init__(self):
    self.specials = {t: 3 + i for i, t in enumerate(chat.SPECIAL_TOKENS)}
    self.vocab_size = 10 + 0x110000

  def encode(self, text):
    return [10 + ord(c) for c in text]

  def decode(self, ids):
    inverse = {v: k for k, v in self.specials.items()}
    return "".join(inverse[i] if i in inverse else chr(i - 10) for i in ids)

  def piece_id(self, piece):
    return self.specials.get(piece)


@pytest.fixture(scope="module")
def sp():
  return train_sentencepiece(SAMPLE, vocab_size=400)


@pytest.fixture(scope="module")
def sp_chat(sp, tmp_path_factory):
  return SentencePieceTokenizer(chat.chat_tokenizer_file(sp, str(tmp_path_factory.mktemp("sp"))))


def test_render_parse_round_trip():
  text = chat.render(CONVERSATION)
  assert text.startswith("<|system|>You are terse.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>")
  assert text.endswith("<|assistant|><think>5 * 4 = 20</think> It is 20. <|end|>")
  assert chat.parse(text) == CONVERSATION
  prompt = chat.render(CONVERSATION[:2], add_generation_prompt=True)
  assert prompt == "<|system|>You are terse.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>"
  assert chat.parse(prompt) == CONVERSATION[:2]
  assert chat.render(chat.parse(text)) == text
  for bad in ["hi<|user|>x<|end|>", "<|user|>x", "<|user|>x<|end|>junk", "<|end|>", "<|user|>a<|user|>"]:
    with pytest.raises(ValueError):
      chat.parse(bad)


@pytest.mark.parametrize("tokenizer_name", ["char", "sentencepiece"])
def test_masks_weight_only_assistant_tokens(tokenizer_name, sp_chat):
  tok = CharTokenizer() if tokenizer_name == "char" else sp_chat
  tokens, mask = chat.encode_chat(tok, CONVERSATION)
  assert len(tokens) == len(mask) and tokens[0] == tok.bos_id and mask[0] == 0
  assert set(mask) == {0, 1}
  end = chat.special_id(tok, chat.END)
  # Each maximal run of masked tokens is one assistant content and its closing <|end|>.
  runs, run = [], []
  for t, m in zip(tokens, mask):
    if m:
      run.append(t)
    elif run:
      runs.append(run)
      run = []
  runs += [run] if run else []
  assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
  assert [r[-1] for r in runs] == [end] * len(assistant)
  decoded = [chat.decode(tok, r) for r in runs]
  if tokenizer_name == "char":
    assert decoded == [c + chat.END for c in assistant]
  else:  # SentencePiece drops leading whitespace of a segment (its dummy prefix).
    assert [d.replace(" ", "") for d in decoded] == [(c + chat.END).replace(" ", "") for c in assistant]
  # Unmasked: bos, role tokens, system and user contents (and their ends).
  assert chat.decode(tok, [t for t, m in zip(tokens[1:], mask[1:]) if not m]).replace(" ", "") == (
      "<|system|>Youareterse.<|end|><|user|>Whatis2+3?<|end|><|assistant|><|user|>"
      "Andtimes4?\nShowit.<|end|><|assistant|>")
  # The tokens are those of the rendered text; the prompt is a prefix of them.
  assert tokens == [tok.bos_id] + chat.encode_text(tok, chat.render(CONVERSATION))
  prompt = chat.encode_prompt(tok, CONVERSATION[:2])
  assert tokens[:len(prompt)] == prompt
  assert chat.stop_tokens(tok) == (end, tok.eos_id)


def test_parse_response():
  r = chat.parse_response("<think> step one </think> 42 <|end|>ignored")
  assert r == chat.Response("step one", "42", True)
  assert chat.parse_response(chat.assistant_content("r", "a")) == chat.Response("r", "a", True)
  assert chat.parse_response("42") == chat.Response(None, "42", False)
  assert chat.parse_response("<think>r</think>   ") == chat.Response(None, "<think>r</think>", False)
  assert chat.parse_response("<think>r</think>a<think>s</think>b").well_formed is False
  assert chat.parse_response("x<think>r</think>a").well_formed is False
  assert chat.parse_response("<think>unclosed answer").answer == "<think>unclosed answer"
  assert chat.parse_response("<think>r</think>a</think>").well_formed is False


def test_validate_messages():
  chat.validate_messages(CONVERSATION)
  with pytest.raises(ValueError, match=r"data.jsonl:3: message 1 has unknown role 'robot'"):
    chat.validate_messages([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}],
                           where="data.jsonl:3")
  bad = [([], "non-empty"), ([{"role": "user"}], "message 0 has no 'content'"),
         ([{"role": "user", "content": 3}], "'content' must be a string"),
         ([{"role": "user", "content": "a<|end|>"}], "reserved token '<|end|>'"),
         ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "message 1"),
         (["hi"], "message 0 must be a dict")]
  for messages, match in bad:
    with pytest.raises(ValueError, match=match):
      chat.validate_messages(messages, where="f.jsonl:1")


def test_sentencepiece_extension_keeps_old_ids(sp, sp_chat):
  assert sp_chat.vocab_size == sp.vocab_size + len(chat.SPECIAL_TOKENS)
  for i in range(sp.vocab_size):
    assert sp_chat.piece_id(sp._sp.id_to_piece(i)) == i
  for text in PROBES + SAMPLE[:4]:
    assert sp_chat.encode(text) == sp.encode(text)
  new_ids = [sp_chat.piece_id(t) for t in chat.SPECIAL_TOKENS]
  assert new_ids == list(range(sp.vocab_size, sp_chat.vocab_size))
  for token, i in zip(chat.SPECIAL_TOKENS, new_ids):
    assert sp.piece_id(token) is None
    assert sp_chat.encode(token) in ([i], [sp_chat.encode(" ")[0], i])  # Maybe a dummy prefix.
    assert [t for t in sp_chat.encode(token) if t >= sp.vocab_size] == [i]
  again = chat.add_special_tokens_sentencepiece(sp_chat.model_proto)
  assert SentencePieceTokenizer(again).vocab_size == sp_chat.vocab_size  # Idempotent.
  assert (sp_chat.bos_id, sp_chat.eos_id, sp_chat.pad_id) == (sp.bos_id, sp.eos_id, sp.pad_id)


def test_hf_extension_keeps_old_ids(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(SAMPLE, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  src = str(tmp_path / "src" / "tokenizer.json")
  (tmp_path / "src").mkdir()
  tok.save(src)
  old = HFTokenizer(src, bos_token="<s>", eos_token="</s>")
  path = chat.chat_tokenizer_file(old, str(tmp_path / "work"))
  new = HFTokenizer(path, bos_token="<s>", eos_token="</s>")
  assert new.vocab_size == old.vocab_size + len(chat.SPECIAL_TOKENS)
  assert (new.bos_id, new.eos_id) == (old.bos_id, old.eos_id)
  for text in PROBES + SAMPLE[:4]:
    assert new.encode(text) == old.encode(text)
  new_ids = [new.piece_id(t) for t in chat.SPECIAL_TOKENS]
  assert new_ids == list(range(old.vocab_size, new.vocab_size))
  for token, i in zip(chat.SPECIAL_TOKENS, new_ids):
    assert old.piece_id(token) is None and new.encode(token) == [i]
  chat.add_special_tokens_hf_json(path, path)  # Idempotent.
  with open(path) as f:
    assert len(json.load(f)["added_tokens"]) == 2 + len(chat.SPECIAL_TOKENS)
  tokens, mask = chat.encode_chat(new, CONVERSATION)
  assert chat.decode(new, tokens[1:]) == chat.render(CONVERSATION)


@pytest.mark.parametrize("tie", [False, True])
def test_grow_vocab(tie):
  cfg = small_config(tie_embeddings=tie)
  model = init_model(cfg, seed=1)
  grown = grow_vocab(model, cfg.vocab_size + 6)
  assert grown.cfg.vocab_size == cfg.vocab_size + 6 and model.cfg.vocab_size == cfg.vocab_size
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
  old, new = forward(model, tokens), forward(grown, tokens)
  y = cfg.vocab_size
  np.testing.assert_allclose(new.logits[..., :y], old.logits, atol=1e-6)
  np.testing.assert_allclose(new.mtp_logits[..., :y], old.mtp_logits, atol=1e-6)
  mean = jnp.mean(old.logits, axis=-1, keepdims=True)
  np.testing.assert_allclose(new.logits[..., y:], jnp.broadcast_to(mean, new.logits[..., y:].shape),
                             atol=1e-5)
  emb = np.asarray(grown.embed.embedding[...])
  np.testing.assert_array_equal(emb[:y], np.asarray(model.embed.embedding[...]))
  np.testing.assert_allclose(emb[y:], np.broadcast_to(emb[:y].mean(0), emb[y:].shape), atol=1e-7)
  assert (grown.head is None) == tie
  with pytest.raises(ValueError, match="smaller"):
    grow_vocab(model, cfg.vocab_size - 1)
