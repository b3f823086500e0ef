"""AdamW with global-norm clipping, warmup + cosine or warmup-stable-decay, and a decay mask."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """DeepSeek-V3 defaults: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0."""

  peak_lr: float = 3e-3
  end_lr_fraction: float = 0.1  # Final learning rate as a fraction of the peak.
  warmup_steps: int = 10
  total_steps: int = 200
  schedule: str = "cosine"  # "cosine" or "wsd" (warmup-stable-decay).
  decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly.
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0

  def __post_init__(self):
    if self.schedule not in ("cosine", "wsd"):
      raise ValueError(f"OptimizerConfig.schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f"OptimizerConfig.warmup_steps ({self.warmup_steps}) must be in "
                       f"[0, total_steps={self.total_steps})")
    if not 0 < self.decay_fraction <= 1:
      raise ValueError(f"OptimizerConfig.decay_fraction must be in (0, 1], got {self.decay_fraction}")


def learning_rate(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to `peak_lr`, then cosine decay or stable-then-linear decay to the end LR."""
  end = cfg.peak_lr * cfg.end_lr_fraction
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.peak_lr, cfg.warmup_steps, cfg.total_steps,
                                              end)
  decay_steps = max(1, int(round(cfg.total_steps * cfg.decay_fraction)))
  stable_steps = cfg.total_steps - cfg.warmup_steps - decay_steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.peak_lr, cfg.warmup_steps),
       optax.constant_schedule(cfg.peak_lr),
       optax.linear_schedule(cfg.peak_lr, end, decay_steps)],
      [cfg.warmup_steps, cfg.warmup_steps + max(stable_steps, 0)])


def decay_mask(params):
  """False for RMSNorm scales (named `scale`, also when stacked [L, D]); True for weights.

  The router's load-balancing bias is not an `nnx.Param`, so it never reaches the optimizer.
  """
  def decays(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] != "scale"
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule, decay mask)."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask))
