"""Growing a model's vocabulary, e.g. for the special tokens of a chat format."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from model.transformer import Transformer


def _grow(x, new_rows: int, axis: int):
  """`x` with `new_rows` copies of its mean along `axis` appended on that axis."""
  mean = jnp.mean(x, axis=axis, keepdims=True)
  reps = [1] * x.ndim
  reps[axis] = new_rows
  return jnp.concatenate([x, jnp.tile(mean, reps).astype(x.dtype)], axis=axis)


def grow_vocab(model: Transformer, vocab_size: int) -> Transformer:
  """A new model with `cfg.vocab_size = vocab_size`: the new ids' embedding rows (and untied head
  columns) start at the mean of the existing ones; every other weight is `model`'s, unchanged.

  ValueError if `vocab_size` is smaller than the model's.
  """
  old = model.cfg.vocab_size
  if vocab_size < old:
    raise ValueError(f"grow_vocab: vocab_size {vocab_size} is smaller than the model's {old}")
  cfg = model.cfg.replace(vocab_size=vocab_size)
  graphdef, target = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  values = nnx.to_pure_dict(nnx.state(model))
  if vocab_size > old:
    values["embed"]["embedding"] = _grow(values["embed"]["embedding"], vocab_size - old, 0)
    if not cfg.tie_embeddings:
      values["head"]["w"] = _grow(values["head"]["w"], vocab_size - old, 1)
  nnx.replace_by_pure_dict(target, values)
  return nnx.merge(graphdef, target)
