"""Basic layers: the einsum projection, RMSNorm, the SwiGLU MLP and the token embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.sharding import constrain, is_split


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  """The dtype matmuls run in; parameters stay float32."""
  return jnp.dtype(cfg.dtype)


def normal_init(cfg: ModelConfig):
  return jax.nn.initializers.normal(stddev=cfg.init_std)


class Einsum(nnx.Module):
  """One projection for every layer: `einsum(spec, x, w)` with a float32 weight of `shape`."""

  def __init__(self, spec: str, shape: tuple[int, ...], cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.spec = spec
    self.dtype = compute_dtype(cfg)
    self.w = nnx.Param(normal_init(cfg)(rngs.params(), shape, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum(self.spec, x.astype(self.dtype), self.w[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis, computed in float32."""

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * x32).astype(self.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, ffn_dim: int, *, rngs: nnx.Rngs):
    self.gate = Einsum("BTD,DF->BTF", (cfg.d_model, ffn_dim), cfg, rngs=rngs)
    self.up = Einsum("BTD,DF->BTF", (cfg.d_model, ffn_dim), cfg, rngs=rngs)
    self.down = Einsum("BTF,FD->BTD", (ffn_dim, cfg.d_model), cfg, rngs=rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    f = self.gate.w.shape[1]
    if is_split("mlp", f):  # Tensor parallel: each device multiplies its own slices of F.
      gate, up = self.gate(x_BTD), self.up(x_BTD)
    else:  # One product against [W_gate | W_up]: on XLA:CPU 9% off the bench-tiny train step.
      dt = self.gate.dtype
      w_DF = jnp.concatenate([self.gate.w[...], self.up.w[...]], axis=1).astype(dt)
      gate, up = jnp.split(jnp.einsum("BTD,DF->BTF", x_BTD.astype(dt), w_DF), [f], axis=-1)
    h_BTF = constrain(jax.nn.silu(gate) * up, "batch", "seq", "mlp")
    return self.down(h_BTF)


class Embed(nnx.Module):
  """Token embedding table [Y, D]; `attend` uses it as a tied output head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = compute_dtype(cfg)
    self.embedding = nnx.Param(
        normal_init(cfg)(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32))

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    return jnp.einsum("BTD,YD->BTY", x_BTD.astype(self.dtype), self.embedding[...].astype(self.dtype))
