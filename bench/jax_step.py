"""Our jitted train step, timed: shared by the step benchmarks (no flags here)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from train import optimizer as opt
from train.step import StepConfig, create_train_state, make_train_step


def time_jax(cfg: ModelConfig, tokens: np.ndarray, steps: int,
             loss_mask: np.ndarray | None = None) -> float:
  """Seconds per jitted train step (AdamW, no MTP), after a compiling warm-up step. `loss_mask`
  [B, T] (over the predicted tokens, tokens[:, 1:]) weights the loss, as SFT's assistant mask
  does; None: every token."""
  from model.transformer import init_model
  ocfg = opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=0, total_steps=1000, weight_decay=0.0)
  tx = opt.make_optimizer(ocfg)
  template, state = create_train_state(init_model(cfg, seed=0), tx)
  step = jax.jit(make_train_step(template, tx, StepConfig(mtp_weight=0.0, balance_weight=0.0,
                                                          bias_gamma=0.0)), donate_argnums=0)
  b, t = tokens.shape[0], tokens.shape[1] - 1
  batch = dict(inputs=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
               positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
               segment_ids=jnp.ones((b, t), jnp.int32),
               loss_mask=jnp.ones((b, t), jnp.float32) if loss_mask is None
               else jnp.asarray(loss_mask, jnp.float32))
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps
