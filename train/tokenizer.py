"""Tokenizers: a SentencePiece model trained on a corpus sample, an existing one, or a HF tokenizer.json."""

from __future__ import annotations

import io
import json
import os
from typing import Iterable, Protocol

import sentencepiece as spm


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
  """A SentencePiece model (file path or serialized bytes)."""

  def __init__(self, model: str | bytes):
    if isinstance(model, str):
      if not os.path.exists(model):
        raise FileNotFoundError(f"SentencePiece model {model!r} does not exist")
      with open(model, "rb") as f:
        model = f.read()
    self.model_proto = model
    self._sp = spm.SentencePieceProcessor(model_proto=model)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def piece_id(self, piece: str) -> int | None:
    """The id of the vocabulary piece `piece` (exactly that piece), or None if there is none."""
    i = self._sp.piece_to_id(piece)
    return i if 0 <= i < self.vocab_size and self._sp.id_to_piece(i) == piece else None


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
  """Trains a byte-fallback BPE SentencePiece model on `texts` (digits split, whitespace kept)."""
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
      normalization_rule_name="identity", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      user_defined_symbols=["\n", "    "], minloglevel=2)
  return SentencePieceTokenizer(out.getvalue())


class HFTokenizer:
  """A HF `tokenizer.json` (DeepSeek's among them), read with the `tokenizers` package."""

  def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None):
    try:
      from tokenizers import Tokenizer as _Tokenizer
    except ImportError as e:
      raise ImportError("HFTokenizer needs the `tokenizers` package (the `hf` extra)") from e
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    self.path, self.bos_token, self.eos_token = path, bos_token, eos_token
    self._tok = _Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    lookup = lambda token, default: self._tok.token_to_id(token) if token else default
    self.bos_id = lookup(bos_token, 0)
    self.eos_id = lookup(eos_token, 1)
    self.pad_id = self.eos_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids])

  def piece_id(self, piece: str) -> int | None:
    """The id of the vocabulary token (or added token) `piece`, or None if there is none."""
    return self._tok.token_to_id(piece)


def _special_token(value) -> str | None:
  """A tokenizer_config.json special-token entry: a string or {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def configured_tokenizer(t, workdir: str):
  """The tokenizer a run config's `tokenizer` section names; a `train_sentencepiece` one is the
  workdir's trained DIR/tokenizer.model (FileNotFoundError until it has been trained). A
  sentencepiece or hf_json kind with an empty path is the workdir's own DIR/tokenizer.model or
  DIR/tokenizer.json (post-training stages write their extended tokenizer there)."""
  if t["kind"] == "sentencepiece":
    return SentencePieceTokenizer(t["path"] or os.path.join(workdir, "tokenizer.model"))
  if t["kind"] == "hf_json":
    return HFTokenizer(t["path"] or os.path.join(workdir, "tokenizer.json"),
                       bos_token=t["bos_token"] or None, eos_token=t["eos_token"] or None)
  if t["kind"] != "train_sentencepiece":
    raise ValueError(f"config.tokenizer.kind must be train_sentencepiece, sentencepiece or hf_json, "
                     f"got {t['kind']!r}")
  return SentencePieceTokenizer(os.path.join(workdir, "tokenizer.model"))


def load_tokenizer(path: str):
  """The tokenizer that goes with a model directory: a workdir's (as its run_config.json says) or a
  HF directory's tokenizer.json (special tokens from tokenizer_config.json)."""
  run_config = os.path.join(path, "run_config.json")
  if os.path.exists(run_config):
    with open(run_config) as f:
      return configured_tokenizer(json.load(f)["tokenizer"], path)
  tokenizer_json = os.path.join(path, "tokenizer.json")
  if not os.path.exists(tokenizer_json):
    raise FileNotFoundError(f"{path!r} has neither run_config.json (workdir) nor tokenizer.json (HF)")
  special = {}
  if os.path.exists(os.path.join(path, "tokenizer_config.json")):
    with open(os.path.join(path, "tokenizer_config.json")) as f:
      special = json.load(f)
  return HFTokenizer(tokenizer_json, bos_token=_special_token(special.get("bos_token")),
                     eos_token=_special_token(special.get("eos_token")))
