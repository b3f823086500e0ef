"""Where every post-training stage starts: a checkpoint (a workdir or a HF directory) with its
tokenizer extended by the chat special tokens and its vocabulary grown to fit them.

New token rows start at the mean embedding (model.vocab.grow_vocab); old ids are unchanged. A
stage writes the extended tokenizer into its own workdir, so the workdir is self-contained: eval
and later stages load it like any other.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
from flax import nnx

from model.transformer import Transformer, with_config
from model.vocab import grow_vocab
from posttrain.chat import SPECIAL_TOKENS, add_special_tokens_sentencepiece, chat_tokenizer_file
from posttrain.lora import load_policy
from train.step import ModelTemplate
from train.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer


def has_chat_tokens(tokenizer) -> bool:
  """Whether `tokenizer` already has every chat special token."""
  return all(tokenizer.piece_id(t) is not None for t in SPECIAL_TOKENS)


def chat_tokenizer(tokenizer, workdir: str | None = None):
  """`tokenizer` with the chat special tokens. With `workdir`, its DIR/tokenizer.model (or
  tokenizer.json) is written once and reused on later runs; without, it is built in memory (a HF
  tokenizer in a temporary directory: its file is what a later write copies)."""
  if has_chat_tokens(tokenizer) and workdir is None:
    return tokenizer
  if workdir is not None:
    name = "tokenizer.model" if isinstance(tokenizer, SentencePieceTokenizer) else "tokenizer.json"
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      path = chat_tokenizer_file(tokenizer, workdir)
  elif isinstance(tokenizer, SentencePieceTokenizer):  # In memory: no file to leave behind.
    return SentencePieceTokenizer(add_special_tokens_sentencepiece(tokenizer.model_proto))
  else:
    path = chat_tokenizer_file(tokenizer, tempfile.mkdtemp(prefix="chat_tokenizer_"))
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  return HFTokenizer(path, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def tokenizer_record(tokenizer) -> dict:
  """The run-config `tokenizer` entry of a stage workdir holding `tokenizer`'s file (an empty
  path: the workdir's own file, see train.tokenizer.configured_tokenizer)."""
  if isinstance(tokenizer, SentencePieceTokenizer):
    return dict(kind="sentencepiece", path="", bos_token="", eos_token="")
  return dict(kind="hf_json", path="", bos_token=tokenizer.bos_token or "",
              eos_token=tokenizer.eos_token or "")


def load_chat_model(path: str, workdir: str | None = None, execution: dict | None = None):
  """(model, tokenizer) of checkpoint `path` ready for chat: the tokenizer extended (written into
  `workdir` when given), the vocabulary grown to fit it, then the `execution` fields (dtype,
  remat, kernels; a context length `max_seq_len`, 0 or absent: the checkpoint's) applied. A LoRA
  workdir's adapters are merged in."""
  model: Transformer = load_policy(path)
  base = load_tokenizer(path)
  if base.vocab_size > model.cfg.vocab_size:  # Growth is for the chat tokens only.
    raise ValueError(f"{path}: its tokenizer has {base.vocab_size} tokens but its model's "
                     f"vocabulary is {model.cfg.vocab_size}: not this model's tokenizer")
  tokenizer = chat_tokenizer(base, workdir)
  vocab = max(model.cfg.vocab_size, tokenizer.vocab_size)
  if vocab > model.cfg.vocab_size:
    model = grow_vocab(model, vocab)
  execution = {k: v for k, v in (execution or {}).items() if not (k == "max_seq_len" and not v)}
  if execution:
    model = with_config(model, model.cfg.replace(**execution))
  return model, tokenizer


def frozen_copy(model) -> tuple[dict, callable]:
  """(tree, rebuild): a host copy of `model`'s variables {"params", "extra"}, to pass as a frozen
  step argument (a reference policy; a copy, because the policy's own buffers are donated to the
  train step), and `rebuild(tree)` -> the model with those values (inside the step)."""
  template = ModelTemplate(model)  # Structure only.
  tree = jax.tree.map(np.array, dict(params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                     extra=nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))))
  return tree, lambda t: template.merge(t["params"], t["extra"])
