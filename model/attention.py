"""Multi-head Latent Attention (DeepSeek-V2/V3) and a grouped-query attention baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.attention import attention, join_heads
from model.config import ModelConfig
from model.layers import Einsum, RMSNorm, compute_dtype
from model.rope import apply_rope
from model.sharding import per_device_attention


def attention_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: causal, and only within the same segment (packed documents stay apart)."""
  t = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TS[None] & same_BTS)[:, None]


def masked_softmax(logits_BNTS: jax.Array, mask_B1TS: jax.Array, dtype) -> jax.Array:
  """Softmax over keys in float32 with masked positions excluded, cast to `dtype`."""
  logits_BNTS = jnp.where(mask_B1TS, logits_BNTS.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_BNTS, axis=-1).astype(dtype)


def dot_product_attention(q_BTNH, k_BSNH, v_BSNV, mask_B1TS, scale: float) -> jax.Array:
  """Softmax(q k^T * scale) v with the softmax in float32; returns [B, T, N, V]."""
  logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH,
                           preferred_element_type=jnp.float32) * scale
  probs_BNTS = masked_softmax(logits_BNTS, mask_B1TS, v_BSNV.dtype)
  return jnp.einsum("BNTS,BSNV->BTNV", probs_BNTS, v_BSNV)


class MLAttention(nnx.Module):
  """Low-rank query, joint KV latent plus one shared RoPE key, expanded per head for training."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, dt = cfg.d_model, cfg.num_heads, compute_dtype(cfg)
    if cfg.q_lora_rank is None:
      self.q = Einsum("BTD,DNH->BTNH", (d, n, cfg.qk_head_dim), cfg, rngs=rngs)
    else:
      self.q_a = Einsum("BTD,DR->BTR", (d, cfg.q_lora_rank), cfg, rngs=rngs)
      self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dt)
      self.q_b = Einsum("BTR,RNH->BTNH", (cfg.q_lora_rank, n, cfg.qk_head_dim), cfg, rngs=rngs)
    self.kv_a = Einsum("BTD,DR->BTR", (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), cfg, rngs=rngs)
    self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dt)
    self.kv_b = Einsum("BTR,RNH->BTNH",
                       (cfg.kv_lora_rank, n, cfg.qk_nope_head_dim + cfg.v_head_dim), cfg, rngs=rngs)
    self.o = Einsum("BTNV,NVD->BTD", (n, cfg.v_head_dim, d), cfg, rngs=rngs)

  def query(self, x_BTD, positions_BT):
    """Per-head queries split into (no-RoPE part [B,T,N,nope], rotated part [B,T,N,P])."""
    cfg = self.cfg
    q_BTNH = self.q(x_BTD) if cfg.q_lora_rank is None else self.q_b(self.q_norm(self.q_a(x_BTD)))
    q_nope, q_rope = jnp.split(q_BTNH, [cfg.qk_nope_head_dim], axis=-1)
    return q_nope, apply_rope(q_rope, positions_BT, cfg)

  def latent(self, x_BTD, positions_BT):
    """The cacheable part: normalised latent [B,T,R] and the rotated shared key [B,T,P]."""
    cfg = self.cfg
    kv_BTR = self.kv_a(x_BTD)
    latent_BTR, k_rope_BTP = jnp.split(kv_BTR, [cfg.kv_lora_rank], axis=-1)
    k_rope_BTP = apply_rope(k_rope_BTP[:, :, None, :], positions_BT, cfg)[:, :, 0, :]
    return self.kv_norm(latent_BTR), k_rope_BTP

  def key_parts(self, latent_BSR, k_rope_BSP):
    """The latent expanded per head: keys as (no-RoPE part [B,S,N,nope], the shared rotated key
    [B,S,1,P]) and values [B,S,N,V]."""
    k_nope, v_BSNV = jnp.split(self.kv_b(latent_BSR), [self.cfg.qk_nope_head_dim], axis=-1)
    return (k_nope, k_rope_BSP[:, :, None, :]), v_BSNV

  def keys_values(self, latent_BSR, k_rope_BSP):
    """Keys [B,S,N,H] (the no-RoPE part + the shared rotated key, broadcast) and values
    [B,S,N,V]."""
    k_parts, v_BSNV = self.key_parts(latent_BSR, k_rope_BSP)
    return join_heads(k_parts, self.cfg.num_heads), v_BSNV

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    """Causal self-attention within segments, through the `cfg.attention_impl` kernel switch
    (queries and keys as (nope, rope) parts: the CPU kernel reads the shared rotated key once)."""
    cfg = self.cfg
    q_parts = self.query(x_BTD, positions_BT)
    k_parts, v_BSNV = self.key_parts(*self.latent(x_BTD, positions_BT))
    out_BTNV = per_device_attention(attention, q_parts, k_parts, v_BSNV, segment_ids_BT,
                                    cfg.softmax_scale, impl=cfg.attention_impl)
    return self.o(out_BTNV)


class GQAttention(nnx.Module):
  """Grouped-query attention (multi-head when num_kv_heads == num_heads), RoPE on the whole head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h = cfg.d_model, cfg.head_dim
    self.q = Einsum("BTD,DNH->BTNH", (d, cfg.num_heads, h), cfg, rngs=rngs)
    self.k = Einsum("BTD,DNH->BTNH", (d, cfg.num_kv_heads, h), cfg, rngs=rngs)
    self.v = Einsum("BTD,DNH->BTNH", (d, cfg.num_kv_heads, h), cfg, rngs=rngs)
    self.o = Einsum("BTNV,NVD->BTD", (cfg.num_heads, h, d), cfg, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    cfg = self.cfg
    groups = cfg.num_heads // cfg.num_kv_heads
    q = apply_rope(self.q(x_BTD), positions_BT, cfg)
    k = jnp.repeat(apply_rope(self.k(x_BTD), positions_BT, cfg), groups, axis=2)
    v = jnp.repeat(self.v(x_BTD), groups, axis=2)
    return self.o(per_device_attention(attention, q, k, v, segment_ids_BT, cfg.softmax_scale,
                                       impl=cfg.attention_impl))


def make_attention(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The attention layer `cfg.attention_type` names."""
  return MLAttention(cfg, rngs=rngs) if cfg.attention_type == "mla" else GQAttention(cfg, rngs=rngs)
