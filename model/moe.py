"""Mixture-of-Experts layer: router, routed experts (dropless or capacity-limited), shared experts."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model import routing, sharding
from model.config import ModelConfig
from model.expert_parallel import sharded_moe_ffn
from model.layers import MLP, compute_dtype, normal_init
from model.moe_dispatch import combine, grouped_swiglu, sort_assignments


class RouterBias(nnx.Variable):
  """The auxiliary-loss-free load-balancing bias: not trained by gradients, updated by the step."""


class RouterStats(NamedTuple):
  """What one MoE layer reports about its routing."""

  tokens_per_expert: jax.Array  # [E] int32 assignments per expert.
  balance_loss: jax.Array  # Scalar sequence-wise balance loss (unweighted).
  dropped: jax.Array  # Scalar int32: assignments dropped by the capacity limit.
  experts: jax.Array  # [B, T, K] int32: the experts each token used (what routing replay records).


class Router(nnx.Module):
  """Linear router in float32 [D, E] plus the selection bias [E]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.w = nnx.Param(normal_init(cfg)(rngs.params(), (cfg.d_model, cfg.num_experts), jnp.float32))
    self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32))

  def __call__(self, x_TD: jax.Array) -> jax.Array:
    return jnp.einsum("TD,DE->TE", x_TD.astype(jnp.float32), self.w[...])


def dropless_ffn(x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD,
                 impl: str = "auto"):
  """Every assignment computed: rows sorted by expert through a grouped matmul (`impl`: the
  kernels.grouped_matmul implementation)."""
  d = sort_assignments(experts_TK, w_gate_EDF.shape[0])
  y_sorted = grouped_swiglu(d.rows(x_TD), d.sizes, w_gate_EDF, w_up_EDF, w_down_EFD, impl)
  return combine(y_sorted, d, weights_TK, x_TD.dtype), jnp.zeros((), jnp.int32)


def capacity(num_tokens: int, cfg: ModelConfig) -> int:
  """Slots per expert: ceil(T * K / E * capacity_factor)."""
  return math.ceil(num_tokens * cfg.experts_per_token / cfg.num_experts * cfg.capacity_factor)


def capacity_ffn(x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, slots: int):
  """Fixed [E, C, D] buffers: each expert takes its first C assignments; the rest are dropped."""
  e = w_gate_EDF.shape[0]
  d = sort_assignments(experts_TK, e)
  slot, kept = d.slots(slots)
  buf_ECD = jnp.zeros((e, slots, x_TD.shape[-1]), x_TD.dtype)
  buf_ECD = buf_ECD.at[d.expert, slot].set(d.rows(x_TD), mode="drop")
  h = (jax.nn.silu(jnp.einsum("ECD,EDF->ECF", buf_ECD, w_gate_EDF))
       * jnp.einsum("ECD,EDF->ECF", buf_ECD, w_up_EDF))
  out_ECD = jnp.einsum("ECF,EFD->ECD", h, w_down_EFD)
  y_sorted = out_ECD.at[d.expert, slot].get(mode="fill", fill_value=0)
  dropped = (kept.size - kept.sum()).astype(jnp.int32)
  return combine(y_sorted, d, weights_TK, x_TD.dtype), dropped


class MoE(nnx.Module):
  """Routed experts [E, D, F] chosen per token, plus always-on shared experts."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_ffn_dim
    init = normal_init(cfg)
    self.router = Router(cfg, rngs=rngs)
    self.w_gate = nnx.Param(init(rngs.params(), (e, d, f), jnp.float32))
    self.w_up = nnx.Param(init(rngs.params(), (e, d, f), jnp.float32))
    self.w_down = nnx.Param(init(rngs.params(), (e, f, d), jnp.float32))
    self.shared = (MLP(cfg, cfg.moe_ffn_dim * cfg.num_shared_experts, rngs=rngs)
                   if cfg.num_shared_experts else None)

  def __call__(self, x_BTD: jax.Array, replay_BTK: jax.Array | None = None
               ) -> tuple[jax.Array, RouterStats]:
    """(output [B, T, D], stats); `replay_BTK`: recorded experts to use (routing.select_experts)."""
    cfg = self.cfg
    b, t, d = x_BTD.shape
    dt = compute_dtype(cfg)
    x_TD = x_BTD.reshape(b * t, d).astype(dt)
    scores_TE = routing.router_scores(self.router(x_TD), cfg)
    replay_TK = None if replay_BTK is None else replay_BTK.reshape(b * t, -1)
    weights_TK, experts_TK = routing.select_experts(scores_TE, self.router.bias[...], cfg,
                                                    replay_TK)
    weights = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
    local_ffn = (functools.partial(dropless_ffn, impl=cfg.moe_impl)
                 if cfg.capacity_factor is None else
                 lambda x, *a: capacity_ffn(x, *a, capacity(x.shape[0], cfg)))
    mesh = sharding.current_mesh()
    if mesh is not None and mesh.size > 1:
      y_TD, dropped = sharded_moe_ffn(x_TD, experts_TK, weights_TK, *weights, mesh,
                                      local_ffn=local_ffn, capacity_factor=cfg.capacity_factor,
                                      impl=cfg.moe_impl, dispatch=cfg.moe_dispatch)
    else:
      y_TD, dropped = local_ffn(x_TD, experts_TK, weights_TK, *weights)
    y_BTD = y_TD.reshape(b, t, d)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    stats = RouterStats(
        tokens_per_expert=routing.tokens_per_expert(experts_TK, cfg.num_experts),
        balance_loss=routing.sequence_balance_loss(
            scores_TE.reshape(b, t, -1), experts_TK.reshape(b, t, -1), cfg),
        dropped=dropped, experts=experts_TK.reshape(b, t, -1))
    return y_BTD, stats
