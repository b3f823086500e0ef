"""The chat format: rendering and parsing conversations, their token ids and loss masks, and the
special tokens it adds to a tokenizer (appended after the existing vocabulary: old ids are kept).

A conversation renders as `<|role|>content<|end|>` per message, e.g.
`<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|><think>...</think>Hello.<|end|>`;
a tool's output is a `<|tool|>` message between assistant turns.
Token ids never depend on how a tokenizer itself treats the special strings: text is split on them
here, the segments encoded with `tokenizer.encode` and the specials looked up by `piece_id`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable

ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's output (posttrain/environments.py).
# Appended in this order; new tokens go last, so a tokenizer extended earlier keeps its ids.
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>",
                  "<|tool|>")
END = "<|end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
_TOKEN_ROLES = {token: role for role, token in ROLE_TOKENS.items()}
_STRUCTURE = tuple(ROLE_TOKENS.values()) + (END,)  # Tokens message contents may not contain.
_STRUCTURE_RE = re.compile("(" + "|".join(re.escape(t) for t in _STRUCTURE) + ")")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def assistant_content(reasoning: str, answer: str) -> str:
  """An assistant message's content: `<think>{reasoning}</think>{answer}`."""
  return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{answer}"


@dataclasses.dataclass(frozen=True)
class Response:
  """A parsed assistant response: reasoning (None when malformed), answer, and whether it was
  well formed."""

  reasoning: str | None
  answer: str
  well_formed: bool


def parse_response(text: str) -> Response:
  """Splits a generated response into reasoning and answer (text after `<|end|>` is dropped).

  Well formed iff it is exactly one `<think>…</think>` at the start followed by a non-empty
  answer; otherwise reasoning is None and the answer is the whole (stripped) text.
  """
  text = text.split(END, 1)[0]
  body = text.lstrip()
  if (body.startswith(THINK_OPEN) and body.count(THINK_OPEN) == 1
      and body.count(THINK_CLOSE) == 1):
    reasoning, answer = body[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    if answer.strip():
      return Response(reasoning.strip(), answer.strip(), True)
  return Response(None, text.strip(), False)


_FENCE_RE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.S)


def fenced_code(text: str) -> str | None:
  """The content of the first Markdown code fence (```python ... ```) in `text`, or None."""
  match = _FENCE_RE.search(text)
  return match.group(1) if match else None


def validate_messages(messages, where: str = "") -> None:
  """Raises ValueError (naming `where`, the message index and the bad role or field) unless
  `messages` is a non-empty list of {"role", "content"} dicts with known roles, string contents
  free of the structural tokens (role tokens, `<|end|>`) and a system message only first."""
  prefix = f"{where}: " if where else ""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"{prefix}messages must be a non-empty list, got {type(messages).__name__}"
                     f"{' (empty)' if isinstance(messages, (list, tuple)) else ''}")
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ValueError(f"{prefix}message {i} must be a dict, got {type(m).__name__}")
    for field in ("role", "content"):
      if field not in m:
        raise ValueError(f"{prefix}message {i} has no {field!r} field (has {sorted(m)})")
    role, content = m["role"], m["content"]
    if role not in ROLES:
      raise ValueError(f"{prefix}message {i} has unknown role {role!r} (roles: {', '.join(ROLES)})")
    if role == "system" and i != 0:
      raise ValueError(f"{prefix}message {i}: a 'system' message may only come first")
    if not isinstance(content, str):
      raise ValueError(f"{prefix}message {i} ({role}): field 'content' must be a string, "
                       f"got {type(content).__name__}")
    for token in _STRUCTURE:
      if token in content:
        raise ValueError(f"{prefix}message {i} ({role}): field 'content' contains the reserved "
                         f"token {token!r}")


def strip_structure(text: str) -> str:
  """`text` with every structural token (role tokens, `<|end|>`) replaced by a space: any text,
  a sampled response included, can then be quoted inside a message."""
  return _STRUCTURE_RE.sub(" ", text)


def turn_content(text: str) -> str:
  """`text` up to its first structural token (a role token or `<|end|>`): what can stand as one
  message's content (a sampled response may run on into a new turn)."""
  return _STRUCTURE_RE.split(text, 1)[0]


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
  """The conversation as text; with `add_generation_prompt`, followed by `<|assistant|>`."""
  validate_messages(messages)
  text = "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages)
  return text + ROLE_TOKENS["assistant"] if add_generation_prompt else text


def parse(text: str) -> list[dict]:
  """The messages of a rendered conversation (the inverse of `render`); a trailing generation
  prompt (`<|assistant|>` with nothing after it) is dropped. ValueError if `text` is malformed."""
  # Alternates text, token, text, ...: parts[0] is the text before the first token.
  parts = _STRUCTURE_RE.split(text)
  messages = []
  if parts[0]:
    raise ValueError(f"chat text must start with a role token, got {parts[0][:40]!r}")
  i = 1
  while i < len(parts):
    token = parts[i]
    if token not in _TOKEN_ROLES:
      raise ValueError(f"expected a role token at message {len(messages)}, got {token!r}")
    content = parts[i + 1]
    if i + 2 >= len(parts):
      if content or token != ROLE_TOKENS["assistant"]:
        raise ValueError(f"message {len(messages)} ({_TOKEN_ROLES[token]}) has no closing {END}")
      break  # The generation prompt.
    if parts[i + 2] != END:
      raise ValueError(f"message {len(messages)} ({_TOKEN_ROLES[token]}) is followed by "
                       f"{parts[i + 2]!r}, not {END}")
    if parts[i + 3]:
      raise ValueError(f"text between messages {len(messages)} and {len(messages) + 1}: "
                       f"{parts[i + 3][:40]!r}")
    messages.append({"role": _TOKEN_ROLES[token], "content": content})
    i += 4
  validate_messages(messages)
  return messages


def special_id(tokenizer, token: str) -> int:
  """The id of the special token `token` in `tokenizer` (ValueError if it lacks it)."""
  i = tokenizer.piece_id(token) if hasattr(tokenizer, "piece_id") else None
  if i is None:
    raise ValueError(f"the tokenizer has no {token!r} token: extend it with "
                     "posttrain.chat.chat_tokenizer_file")
  return i


def encode_text(tokenizer, text: str) -> list[int]:
  """`text` with the special strings as their ids and the text between them tokenizer-encoded."""
  ids = []
  for part in _SPECIAL_RE.split(text):
    if part in SPECIAL_TOKENS:
      ids.append(special_id(tokenizer, part))
    elif part:
      ids.extend(tokenizer.encode(part))
  return ids


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
  """(tokens, loss_mask) of a conversation: bos, then per message its role token, content and
  `<|end|>`. The mask is 1 exactly on assistant content tokens and their closing `<|end|>`."""
  validate_messages(messages)
  end = special_id(tokenizer, END)
  tokens, mask = [tokenizer.bos_id], [0]
  for m in messages:
    content = encode_text(tokenizer, m["content"]) + [end]
    weight = 1 if m["role"] == "assistant" else 0
    tokens += [special_id(tokenizer, ROLE_TOKENS[m["role"]])] + content
    mask += [0] + [weight] * len(content)
  return tokens, mask


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
  """bos and the conversation with a generation prompt: what sampling continues from."""
  return [tokenizer.bos_id] + encode_text(tokenizer, render(messages, add_generation_prompt=True))


def stop_tokens(tokenizer) -> tuple[int, ...]:
  """The ids that end an assistant turn: (`<|end|>`, eos)."""
  return (special_id(tokenizer, END), tokenizer.eos_id)


def decode(tokenizer, ids: Iterable[int]) -> str:
  """Ids as text, the special tokens written out (a HF tokenizer's own decode drops them)."""
  specials = {}
  for t in SPECIAL_TOKENS:
    i = tokenizer.piece_id(t) if hasattr(tokenizer, "piece_id") else None
    if i is not None:
      specials[i] = t
  out, run = [], []
  for i in (int(i) for i in ids):
    if i in specials:
      out += [tokenizer.decode(run)] if run else []
      out.append(specials[i])
      run = []
    else:
      run.append(i)
  out += [tokenizer.decode(run)] if run else []
  return "".join(out)


# Special tokens in tokenizer files.


def add_special_tokens_sentencepiece(model_proto: bytes, tokens=SPECIAL_TOKENS) -> bytes:
  """A serialized SentencePiece model with the missing `tokens` appended as USER_DEFINED pieces
  (ids vocab_size, vocab_size + 1, ...); existing pieces keep their ids. Idempotent."""
  from sentencepiece import sentencepiece_model_pb2 as pb
  proto = pb.ModelProto()
  proto.ParseFromString(model_proto)
  present = {p.piece for p in proto.pieces}
  for token in tokens:
    if token not in present:
      proto.pieces.add(piece=token, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
      present.add(token)
  proto.trainer_spec.vocab_size = len(proto.pieces)
  return proto.SerializeToString()


def _hf_vocab_size(tok: dict) -> int:
  """One more than the largest id of a tokenizer.json's model vocabulary and added tokens."""
  vocab = tok.get("model", {}).get("vocab") or {}
  ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
  ids += [t["id"] for t in tok.get("added_tokens") or []]
  return max(ids, default=-1) + 1


def add_special_tokens_hf_dict(tok: dict, tokens=SPECIAL_TOKENS) -> dict:
  """A parsed tokenizer.json with the missing `tokens` appended to "added_tokens" (special, fresh
  ids from the vocabulary size up; a token already in the model vocabulary keeps its id)."""
  tok = json.loads(json.dumps(tok))
  added = tok["added_tokens"] = tok.get("added_tokens") or []
  vocab = tok.get("model", {}).get("vocab")
  vocab = vocab if isinstance(vocab, dict) else {}
  present = {t["content"] for t in added}
  for token in tokens:
    if token in present:
      continue
    new_id = vocab[token] if token in vocab else _hf_vocab_size(tok)
    added.append({"id": new_id, "content": token, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True})
    present.add(token)
  return tok


def add_special_tokens_hf_json(src_path: str, dst_path: str, tokens=SPECIAL_TOKENS) -> None:
  """Writes `src_path`'s tokenizer.json to `dst_path` with the missing `tokens` added (see
  `add_special_tokens_hf_dict`). Idempotent; `dst_path` may be `src_path`."""
  with open(src_path, encoding="utf-8") as f:
    tok = json.load(f)
  from train.checkpoint import write_atomically
  write_atomically(dst_path, json.dumps(add_special_tokens_hf_dict(tok, tokens), ensure_ascii=False))


def chat_tokenizer_file(tokenizer, workdir: str) -> str:
  """Writes `tokenizer` with the chat special tokens into `workdir` (tokenizer.model for
  SentencePiece, tokenizer.json for HF) and returns the file's path."""
  from train.checkpoint import write_atomically
  from train.tokenizer import HFTokenizer, SentencePieceTokenizer
  os.makedirs(workdir, exist_ok=True)
  if isinstance(tokenizer, SentencePieceTokenizer):
    path = os.path.join(workdir, "tokenizer.model")
    write_atomically(path, add_special_tokens_sentencepiece(tokenizer.model_proto))
    return path
  if isinstance(tokenizer, HFTokenizer):
    path = os.path.join(workdir, "tokenizer.json")
    add_special_tokens_hf_json(tokenizer.path, path)
    return path
  raise TypeError(f"chat_tokenizer_file needs a SentencePieceTokenizer or HFTokenizer, got "
                  f"{type(tokenizer).__name__}")
