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
  """Seconds per jitted train step (AdamW, no MTP) of the language-model loss (the median of
  `steps`), after a compiling warm-up step. `loss_mask` [B, T] (over the predicted tokens,
  tokens[:, 1:]) weights the loss, as SFT's assistant mask does; None: every token."""
  b, t = tokens.shape[0], tokens.shape[1] - 1
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
               segment_ids=np.ones((b, t), np.int32),
               loss_mask=np.ones((b, t), np.float32) if loss_mask is None
               else np.asarray(loss_mask, np.float32))
  return time_step(cfg, batch, steps)


def time_step(cfg: ModelConfig, batch: dict, steps: int, loss_fn=None, frozen=None) -> float:
  """Seconds per jitted train step (AdamW) of a stage's `loss_fn` (default: the language-model
  loss without MTP) on `batch`, with `frozen` trees (a reference model): the median of `steps`,
  after a warm-up step."""
  from model.transformer import init_model
  ocfg = opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=0, total_steps=1000, weight_decay=0.0)
  tx = opt.make_optimizer(ocfg)
  template, state = create_train_state(init_model(cfg, seed=0), tx)
  step = jax.jit(make_train_step(template, tx, StepConfig(mtp_weight=0.0, balance_weight=0.0,
                                                          bias_gamma=0.0), loss_fn=loss_fn),
                 donate_argnums=0)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  frozen = {} if frozen is None else frozen
  state, metrics = step(state, batch, frozen)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):  # Each step timed alone; the median resists the shared machine's noise.
    start = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times))
