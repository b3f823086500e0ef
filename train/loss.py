"""Language-model losses over packed rows: next-token and multi-token prediction."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import packing as packing_lib


def token_cross_entropy(logits_BTY, targets_BT, weights_BT):
  """(sum of weighted cross-entropies, sum of weights), in float32."""
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTY.astype(jnp.float32), targets_BT)
  weights_BT = weights_BT.astype(jnp.float32)
  return (ce_BT * weights_BT).sum(), weights_BT.sum()


def mtp_targets(targets_BT, segment_ids_BT, weights_BT, depth: int):
  """Targets for MTP depth `depth` (token t + 1 + depth at position t) and their weights.

  A position counts only if that token exists, is in the same document and carries weight.
  """
  pad = ((0, 0), (0, depth))
  shifted = jnp.pad(targets_BT[:, depth:], pad)
  same_doc = jnp.pad(segment_ids_BT[:, depth:], pad, constant_values=-1) == segment_ids_BT
  valid = same_doc & (jnp.pad(weights_BT[:, depth:], pad) > 0) & (weights_BT > 0)
  return shifted, valid.astype(jnp.float32)


def mean_or_zero(total, count):
  return total / jnp.maximum(count, 1.0)


def token_logprobs(logits_BTY, tokens_BT, mask_BT, temperature: float = 1.0):
  """Per-token log p(tokens[t] | tokens[:t]) [B, T] from a forward pass's logits at
  `temperature`, where mask[t] is set (else 0; entry 0 is always 0): sequence_logprobs' core,
  for a caller that already ran the model (PPO's policy with a value head)."""
  logits_BTY = logits_BTY[:, :-1].astype(jnp.float32) / temperature
  picked_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTY, axis=-1),
                                  tokens_BT[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked_BT, ((0, 0), (1, 0))) * mask_BT.astype(jnp.float32).at[:, 0].set(0)


def layers_first(replay_BLTK):
  """Recorded experts as batches hold them, [rows, MoE layers, T, K], in the model's layout
  [MoE layers, rows, T, K] (None stays None)."""
  return None if replay_BLTK is None else jnp.swapaxes(replay_BLTK, 0, 1)


def sequence_logprobs(model, tokens_BT, mask_BT, positions_BT=None, segment_ids_BT=None,
                      temperature: float = 1.0, with_output: bool = False, replay_BLTK=None,
                      packing=None):
  """Log-probabilities of `tokens` under `model`: (per token [B, T], per-sequence sum [B]), and
  the model's output (router statistics, hidden states) third when `with_output`.

  Entry t is log p(tokens[t] | tokens[:t]) at `temperature` where mask[t] is set, else 0 (the
  first token has no prediction and is always 0). The one log-prob function of every stage: SFT
  metrics, DPO, PPO, GRPO and the AI-feedback judge. `replay_BLTK`: experts recorded by the
  sampler per row, MoE layer, position and slot (routing replay; -1: route as usual). The MTP
  modules are not run (the output has no mtp_logits; its router statistics are the main
  layers').
  `packing`: a plan of train/packing.py for right-padded rows (positions and segments then come
  from it): the forward runs on the packed rows, the results come back in the rows' layout (the
  output's router statistics and hidden states stay packed).
  """
  if packing is None:
    out = model(tokens_BT, positions_BT, segment_ids_BT, layers_first(replay_BLTK), mtp=False)
    per_token_BT = token_logprobs(out.logits, tokens_BT, mask_BT, temperature)
  else:
    if positions_BT is not None or segment_ids_BT is not None:
      raise ValueError("sequence_logprobs: a packing plan gives the positions and segments")
    source, positions = packing["pack_source"], packing["pack_positions"]
    tokens = packing_lib.pack(tokens_BT, source)
    mask = packing_lib.pack(mask_BT, source) * (positions > 0)  # A row's first token: no target.
    replay = None if replay_BLTK is None else jnp.moveaxis(  # [B, L, T, K] -> [L, R, W, K]
        packing_lib.pack(jnp.moveaxis(replay_BLTK, 1, 2), source, fill=-1), 2, 0)
    out = model(tokens, positions, packing["pack_segments"], replay, mtp=False)
    per_token_BT = packing_lib.unpack(token_logprobs(out.logits, tokens, mask, temperature),
                                      packing["pack_target"])
  if with_output:
    return per_token_BT, per_token_BT.sum(-1), out
  return per_token_BT, per_token_BT.sum(-1)


@functools.partial(nnx.jit, static_argnames=("temperature",))
def jitted_logprobs(model, tokens_BT, mask_BT, temperature: float = 1.0, replay_BLTK=None):
  """`sequence_logprobs` jitted, for callers outside a train step (rollouts' old log-probs, cached
  reference log-probs, a judge's answer probabilities): (per token [B, T], per-sequence sum [B])."""
  return sequence_logprobs(model, tokens_BT, mask_BT, temperature=temperature,
                           replay_BLTK=replay_BLTK)
