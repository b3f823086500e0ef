"""Routing maths for the MoE layer, as small pure functions over [tokens, experts] arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import ModelConfig


def router_scores(logits_TE: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Affinity scores in float32: sigmoid (V3) or softmax over experts (V2)."""
  logits_TE = logits_TE.astype(jnp.float32)
  if cfg.score_func == "sigmoid":
    return jax.nn.sigmoid(logits_TE)
  return jax.nn.softmax(logits_TE, axis=-1)


def group_mask(choice_TE: jax.Array, cfg: ModelConfig) -> jax.Array:
  """[T, E] boolean: experts in the `topk_groups` best groups of each token.

  A group scores the sum of its top-2 choice scores ("noaux_tc", V3) or its best one
  ("group_limited_greedy", V2).
  """
  t, e = choice_TE.shape
  g = cfg.num_expert_groups
  grouped_TGE = choice_TE.reshape(t, g, e // g)
  if cfg.topk_method == "noaux_tc":
    group_score_TG = jax.lax.top_k(grouped_TGE, 2)[0].sum(-1)
  else:
    group_score_TG = grouped_TGE.max(-1)
  _, keep_TK = jax.lax.top_k(group_score_TG, cfg.topk_groups)
  keep_TG = jnp.zeros((t, g), bool).at[jnp.arange(t)[:, None], keep_TK].set(True)
  return jnp.repeat(keep_TG, e // g, axis=1)


def select_experts(scores_TE: jax.Array, bias_E: jax.Array, cfg: ModelConfig,
                   replay_TK: jax.Array | None = None):
  """Chooses K experts per token with the biased scores; weights come from the unbiased ones.

  `replay_TK` (routing replay): experts recorded elsewhere (the sampler) that a token uses instead
  of its own choice; a token with any entry < 0 routes itself. Weights are always this layer's
  scores at the experts used.

  Returns (weights [T, K] float32, experts [T, K] int32).
  """
  choice_TE = scores_TE + bias_E.astype(jnp.float32)
  if cfg.grouped_routing:
    choice_TE = jnp.where(group_mask(choice_TE, cfg), choice_TE, -jnp.inf)
  _, experts_TK = jax.lax.top_k(choice_TE, cfg.experts_per_token)
  if replay_TK is not None:
    replay_TK = replay_TK.astype(experts_TK.dtype)
    experts_TK = jnp.where(jnp.all(replay_TK >= 0, -1, keepdims=True), replay_TK, experts_TK)
  weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
  if cfg.norm_topk_prob:
    weights_TK = weights_TK / (weights_TK.sum(-1, keepdims=True) + 1e-20)
  return weights_TK * cfg.routed_scaling_factor, experts_TK.astype(jnp.int32)


def tokens_per_expert(experts_TK: jax.Array, num_experts: int) -> jax.Array:
  """How many (token, slot) assignments each expert received: [E] int32."""
  return jnp.zeros((num_experts,), jnp.int32).at[experts_TK.reshape(-1)].add(1)


def sequence_balance_loss(scores_BTE: jax.Array, experts_BTK: jax.Array, cfg: ModelConfig):
  """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, averaged over sequences (unweighted).

  f_i = E / (K T) * (tokens of the sequence sent to expert i); P_i = mean over the sequence of the
  token's score for i, normalised over experts.
  """
  _, t, e = scores_BTE.shape
  k = experts_BTK.shape[-1]
  counts_BE = jax.vmap(lambda x: tokens_per_expert(x, e))(experts_BTK).astype(jnp.float32)
  f_BE = counts_BE * e / (k * t)
  p_BE = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(axis=1)
  return (f_BE * p_BE).sum(-1).mean()
