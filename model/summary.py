"""Prints a preset's parameter counts and FLOPs as JSON; for small presets also runs fwd+bwd.

  python -m model.summary --preset=deepseek_v3_671b
  python -m model.summary --preset=all
  python -m model.summary --preset=tiny --run_steps=3
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx

from model.config import PRESETS, ModelConfig, get_preset
from model.transformer import init_model

_PRESET = flags.DEFINE_string("preset", "tiny", "A preset name from model.config.PRESETS, or 'all'.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Sequence length for FLOPs per token.")
_RUN_STEPS = flags.DEFINE_integer("run_steps", 3, "Forward+backward passes to time (tiny only).")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size of the timed forward+backward.")


def describe(name: str, cfg: ModelConfig, seq_len: int) -> dict:
  """Parameter counts (from shapes alone) and training FLOPs per token of a config."""
  start = time.perf_counter()
  counts = cfg.param_counts()
  return dict(preset=name, **counts, flops_per_token=cfg.flops_per_token(seq_len),
              seq_len=seq_len, eval_shape_seconds=round(time.perf_counter() - start, 3))


def time_forward_backward(cfg: ModelConfig, batch: int, seq_len: int, steps: int) -> dict:
  """Jitted next-token loss and gradient on random tokens: loss and seconds per step."""
  model = init_model(cfg, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, cfg.vocab_size)

  @jax.jit
  def loss_and_grad(params, tokens):
    def loss_fn(p):
      out = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:]).mean()
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = jax.block_until_ready(loss_and_grad(params, tokens))  # Compile.
  start = time.perf_counter()
  for _ in range(steps):
    loss, grads = jax.block_until_ready(loss_and_grad(params, tokens))
  seconds = (time.perf_counter() - start) / max(steps, 1)
  grad_norm = optax.global_norm(grads)
  return dict(loss=float(loss), grad_norm=float(grad_norm), seconds_per_step=round(seconds, 4),
              batch=batch, seq_len=seq_len, tokens_per_sec=round(batch * seq_len / seconds, 1))


def main(argv):
  del argv
  names = sorted(PRESETS) if _PRESET.value == "all" else [_PRESET.value]
  for name in names:
    cfg = get_preset(name)
    print(json.dumps(describe(name, cfg, _SEQ_LEN.value)), flush=True)
  if _PRESET.value == "tiny" and _RUN_STEPS.value:
    cfg = get_preset("tiny")
    result = time_forward_backward(cfg, _BATCH.value, min(cfg.max_seq_len, 128), _RUN_STEPS.value)
    print(json.dumps(dict(preset="tiny", forward_backward=result)), flush=True)


if __name__ == "__main__":
  app.run(main)
