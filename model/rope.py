"""Rotary position embedding with interleaved pairs, and DeepSeek's YaRN context extension."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig, yarn_mscale


def _yarn_correction_dim(rotations: float, dim: int, base: float, max_len: int) -> float:
  """The rotary dimension whose wavelength completes `rotations` turns over `max_len` positions."""
  return dim * math.log(max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies [P/2], YaRN-blended when `cfg.yarn` is set."""
  dim = cfg.rope_dim
  base = cfg.rope_theta
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  if cfg.yarn is None:
    return inv_freq.astype(np.float32)
  y = cfg.yarn
  low = math.floor(_yarn_correction_dim(y.beta_fast, dim, base, y.original_max_len))
  high = math.ceil(_yarn_correction_dim(y.beta_slow, dim, base, y.original_max_len))
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # Avoids a zero-width ramp, as the reference does.
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1.0 - ramp  # 1 for high frequencies (extrapolate), 0 for low ones (interpolate).
  return (inv_freq / y.factor * (1 - keep) + inv_freq * keep).astype(np.float32)


def attention_factor(cfg: ModelConfig) -> float:
  """YaRN's cos/sin magnitude: mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
  if cfg.yarn is None:
    return 1.0
  y = cfg.yarn
  if y.mscale and y.mscale_all_dim:
    return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
  return yarn_mscale(y.factor)


def apply_rope(x_BTNP: jax.Array, positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Rotates interleaved pairs (x0,x1),(x2,x3),... of the last axis by position, in float32."""
  inv_freq = jnp.asarray(inverse_frequencies(cfg))
  angles_BTP = positions_BT[..., None].astype(jnp.float32) * inv_freq
  scale = attention_factor(cfg)
  cos = (jnp.cos(angles_BTP) * scale)[:, :, None, :]
  sin = (jnp.sin(angles_BTP) * scale)[:, :, None, :]
  x = x_BTNP.astype(jnp.float32)
  even, odd = x[..., 0::2], x[..., 1::2]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape).astype(x_BTNP.dtype)
