"""Cached decoding for MLA models: prefill a prompt into a KV cache, then extend it token by token.

Two cache layouts:
  "latent"    per token and layer only the normalised latent [R] and the rotated shared RoPE key [P]
              (MLA's compressed cache). Decoding absorbs the key up-projection into the query and
              the value up-projection into the output, so the cache is never expanded:
                scores = (q_nope W_k) . latent + q_rope . k_rope,   out = (probs . latent) W_v.
  "expanded"  per-head keys [N, H] and values [N, V], as multi-head attention caches them: the
              baseline the latent cache is measured against.

Prefill runs the training-path attention over the prompt (expanded, causal) and writes the cache.
Prompts are right-padded: row b holds `lengths[b]` real tokens; a decode step writes each row's
new token at its own length, so padding slots are overwritten before they can be attended to.
The cache is an explicit pytree passed in and returned; nothing is stored on the module.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import MLAttention, dot_product_attention, masked_softmax
from model.config import ModelConfig
from model.layers import compute_dtype
from model.sharding import constrain
from model.transformer import Block, Transformer, scans_layers

CACHE_KINDS = ("latent", "expanded")


class LayerCache(NamedTuple):
  """One layer stack's cache, stacked over its layers: latent ([L,B,S,R], [L,B,S,P]) or expanded
  ([L,B,S,N,H] keys, [L,B,S,N,V] values)."""

  first: jax.Array
  second: jax.Array

  def constrained(self) -> "LayerCache":
    """Sharded over the batch axes of the mesh in context (and over heads when expanded)."""
    axes = lambda a: ("layers", "batch", "seq") + (("heads", None) if a.ndim == 5 else (None,))
    return LayerCache(*(constrain(a, *axes(a)) for a in self))


@flax.struct.dataclass
class Cache:
  """The decoding state: per-stack caches (dense layers, MoE layers) and the filled length per row."""

  stacks: tuple[Optional[LayerCache], Optional[LayerCache]]
  lengths: jax.Array  # [B] int32: positions written so far; the next token goes at this index.
  kind: str = flax.struct.field(pytree_node=False, default="latent")
  # Routing record, when asked for: [moe layers, B, S, K] int32 experts each cached token used
  # (-1 where nothing was run yet): what the training forward replays (routing replay).
  experts: Optional[jax.Array] = None

  @property
  def nbytes(self) -> int:
    """Bytes held by the cached keys/values (the lengths vector excluded)."""
    return sum(x.size * x.dtype.itemsize for s in self.stacks if s is not None for x in s)

  @property
  def max_len(self) -> int:
    return next(s for s in self.stacks if s is not None).first.shape[2]


def cache_bytes_per_token(cfg: ModelConfig, kind: str = "latent") -> int:
  """Cache bytes one token costs across all layers, in the model's compute dtype."""
  per_layer = ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) if kind == "latent" else
               cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim))
  return per_layer * cfg.num_layers * compute_dtype(cfg).itemsize


def _check_mla(cfg: ModelConfig, kind: str):
  if cfg.attention_type != "mla":
    raise ValueError(f"cached decoding needs attention_type='mla', the model has "
                     f"{cfg.attention_type!r}")
  if kind not in CACHE_KINDS:
    raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {kind!r}")


def absorbed_attention(attn: MLAttention, x_BTD, positions_BT, latent_BSR, k_rope_BSP, mask_B1TS):
  """MLA over a latent cache without expanding it: W_k folded into the query, W_v into the output."""
  cfg = attn.cfg
  dt = compute_dtype(cfg)
  q_nope, q_rope = attn.query(x_BTD, positions_BT)
  w_k_RNH, w_v_RNV = jnp.split(attn.kv_b.w[...].astype(dt), [cfg.qk_nope_head_dim], axis=-1)
  q_latent_BTNR = jnp.einsum("BTNH,RNH->BTNR", q_nope, w_k_RNH)
  f32 = dict(preferred_element_type=jnp.float32)  # Scores in float32, as the training path.
  logits_BNTS = (jnp.einsum("BTNR,BSR->BNTS", q_latent_BTNR, latent_BSR.astype(dt), **f32)
                 + jnp.einsum("BTNP,BSP->BNTS", q_rope, k_rope_BSP.astype(dt), **f32))
  probs_BNTS = masked_softmax(logits_BNTS * cfg.softmax_scale, mask_B1TS, dt)
  # [B, N x T, S] @ [B, S, R]: a plain batched matmul (XNNPACK on CPU), then heads after time.
  context_BTNR = jnp.swapaxes(jnp.einsum("BNTS,BSR->BNTR", probs_BNTS, latent_BSR.astype(dt)),
                              1, 2)
  return attn.o(jnp.einsum("BTNR,RNV->BTNV", context_BTNR, w_v_RNV))


def _entries(attn: MLAttention, kind: str, x_BTD, positions_BT):
  """What `kind` caches for the tokens x: (latent, rotated key) or (keys, values)."""
  latent_BTR, k_rope_BTP = attn.latent(x_BTD, positions_BT)
  return ((latent_BTR, k_rope_BTP) if kind == "latent"
          else attn.keys_values(latent_BTR, k_rope_BTP))


def _prefill_stack(blocks: Optional[Block], kind, x_BTD, positions_BT, segment_ids_BT, max_len,
                   record: bool = False):
  """Runs the prompt through one stack; returns (x, the stack's cache padded to max_len, the
  experts of its MoE layers [L, B, max_len, K] when `record`, else None)."""
  if blocks is None:
    return x_BTD, None, None
  graphdef, state = nnx.split(blocks)

  def body(h_BTD, layer_state):
    block = nnx.merge(graphdef, layer_state)
    entries = _entries(block.attn, kind, block.attn_norm(h_BTD), positions_BT)
    h_BTD, stats = block(h_BTD, positions_BT, segment_ids_BT)
    return h_BTD, (entries, stats.experts if record and stats is not None else None)

  x_BTD, ((first, second), experts) = jax.lax.scan(body, x_BTD, state)
  pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, max_len - a.shape[2])] + [(0, 0)] * (a.ndim - 3))
  return x_BTD, LayerCache(pad(first), pad(second)).constrained(), (
      None if experts is None else pad(experts))


def _prompt_layout(lengths_B, t: int):
  """Positions [B, T] and segment ids [B, T] of right-padded prompts: row b's first `lengths[b]`
  tokens are segment 1, its padding segment 0."""
  positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (lengths_B.shape[0], t))
  return positions_BT, (positions_BT < lengths_B[:, None]).astype(jnp.int32)


def prefill_hidden(model: Transformer, tokens_BT, lengths_B, max_len: int, kind: str = "latent",
                   record_experts: bool = False):
  """Runs right-padded prompts (row b: `lengths[b]` tokens) and caches them for `max_len` positions.
  `record_experts`: the cache also records the experts every token is routed to (Cache.experts).

  Returns (the last block's hidden states [B, T, D] before the final norm, Cache).
  """
  cfg = model.cfg
  _check_mla(cfg, kind)
  t = tokens_BT.shape[1]
  if t > max_len:
    raise ValueError(f"prompt length {t} exceeds the cache length {max_len}")
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  positions_BT, segment_ids_BT = _prompt_layout(lengths_B, t)
  x_BTD = model.embed(tokens_BT)
  x_BTD, dense, _ = _prefill_stack(model.dense_layers, kind, x_BTD, positions_BT, segment_ids_BT,
                                   max_len)
  x_BTD, moe, experts = _prefill_stack(model.moe_layers, kind, x_BTD, positions_BT, segment_ids_BT,
                                       max_len, record_experts)
  if experts is not None:  # Padding and not-yet-decoded positions: -1 (nothing recorded).
    real_1BS1 = (jnp.arange(max_len)[None, :] < lengths_B[:, None])[None, :, :, None]
    experts = jnp.where(real_1BS1, experts, -1)
  return x_BTD, Cache((dense, moe), lengths_B, kind, experts)


def last_token_logits(model: Transformer, x_BTD, lengths_B):
  """Float32 logits [B, Y] at each row's last real position of hidden states [B, T, D]."""
  last_B1D = jnp.take_along_axis(x_BTD, jnp.maximum(lengths_B - 1, 0)[:, None, None], axis=1)
  return model.output_logits(model.final_norm(last_B1D))[:, 0]


def prefill(model: Transformer, tokens_BT, lengths_B, max_len: int, kind: str = "latent",
            record_experts: bool = False):
  """`prefill_hidden`, returning (float32 logits [B, Y] at each row's last prompt token, Cache)."""
  x_BTD, cache = prefill_hidden(model, tokens_BT, lengths_B, max_len, kind, record_experts)
  return last_token_logits(model, x_BTD, cache.lengths), cache


def _write(stack_array, layer, rows_B1, slots_BT, values_BT):
  """Writes values [B, T, ...] at (layer, row b, slot slots[b, t]) of a stacked cache array."""
  return stack_array.at[layer, rows_B1, slots_BT].set(values_BT.astype(stack_array.dtype))


def _decode_stack(blocks: Optional[Block], kind, stack: Optional[LayerCache], x_BTD, positions_BT,
                  mask_B1TS, record: bool = False, layer_states=None):
  """Extends one stack's cache with the new tokens and runs them through its layers; also
  returns the MoE layers' experts of the new tokens [L, B, T, K] when `record`, else None.
  `layer_states`: the stack's per-layer parameters already sliced (`unstacked_layers`), run in a
  Python loop; else a scan slices them."""
  if blocks is None:
    return x_BTD, None, None
  graphdef, state = nnx.split(blocks)
  rows_B1 = jnp.arange(x_BTD.shape[0])[:, None]

  def body(carry, xs):
    h_BTD, first, second = carry
    layer_state, layer = xs
    block = nnx.merge(graphdef, layer_state)
    normed = block.attn_norm(h_BTD)
    new_first, new_second = _entries(block.attn, kind, normed, positions_BT)
    first = _write(first, layer, rows_B1, positions_BT, new_first)
    second = _write(second, layer, rows_B1, positions_BT, new_second)
    if kind == "latent":
      out = absorbed_attention(block.attn, normed, positions_BT, first[layer], second[layer],
                               mask_B1TS)
    else:
      q_nope, q_rope = block.attn.query(normed, positions_BT)
      out = block.attn.o(dot_product_attention(
          jnp.concatenate([q_nope, q_rope], -1), first[layer], second[layer], mask_B1TS,
          block.attn.cfg.softmax_scale))
    h_BTD, stats = block.feed_forward(h_BTD + out)
    return (h_BTD, first, second), stats.experts if record and stats is not None else None

  if layer_states is None:
    layers = jnp.arange(stack.first.shape[0])
    (x_BTD, first, second), experts = jax.lax.scan(body, (x_BTD, *stack), (state, layers))
  else:
    carry, experts = (x_BTD, *stack), []
    for layer, layer_state in enumerate(layer_states):
      carry, layer_experts = body(carry, (layer_state, layer))
      experts.append(layer_experts)
    (x_BTD, first, second) = carry
    experts = None if experts[0] is None else jnp.stack(experts)
  return x_BTD, LayerCache(first, second).constrained(), experts


def unstacked_layers(model: Transformer):
  """(dense, MoE) per-layer parameter states for `decode_step`, each stack sliced once, or None
  for a stack that runs as a scan (`transformer.scans_layers`). Sliced outside a decode loop's
  token loop, the layers are copied once per call (the loop then holds a second copy of the
  stacks' weights) and read in place at every token; a scan inside the loop copies each layer's
  weights out of the stack at every token (on CPU, most of a small batch's decode time)."""
  def split(blocks):
    if blocks is None:
      return None
    state = nnx.state(blocks)
    n = jax.tree.leaves(state)[0].shape[0]
    if scans_layers(model.cfg, n):
      return None
    return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(n)]
  return split(model.dense_layers), split(model.moe_layers)


def _positions_and_mask(lengths_B, t: int, max_len: int):
  """Positions [B, T] of T new tokens appended at each row's length, and the mask [B, 1, T, S]
  letting each see the cache slots up to its own position."""
  positions_BT = lengths_B[:, None] + jnp.arange(t, dtype=jnp.int32)
  slots_S = jnp.arange(max_len, dtype=jnp.int32)
  return positions_BT, (slots_S[None, None, :] <= positions_BT[:, :, None])[:, None]


def decode_hidden(model: Transformer, cache: Cache, tokens_BT, layers=(None, None)):
  """Appends tokens [B, T] at each row's length; returns (the last block's hidden states
  [B, T, D] before the final norm, cache). `layers`: `unstacked_layers(model)`, for a loop."""
  b, t = tokens_BT.shape
  positions_BT, mask_B1TS = _positions_and_mask(cache.lengths, t, cache.max_len)
  x_BTD = model.embed(tokens_BT)
  dense, moe = cache.stacks
  x_BTD, dense, _ = _decode_stack(model.dense_layers, cache.kind, dense, x_BTD, positions_BT,
                                  mask_B1TS, layer_states=layers[0])
  record = cache.experts
  x_BTD, moe, experts = _decode_stack(model.moe_layers, cache.kind, moe, x_BTD, positions_BT,
                                      mask_B1TS, record is not None, layers[1])
  if record is not None:  # [L, B, T, K] of the new tokens, written at their positions.
    record = record.at[:, jnp.arange(b)[:, None], positions_BT].set(experts)
  return x_BTD, Cache((dense, moe), cache.lengths + t, cache.kind, record)


def decode_step(model: Transformer, cache: Cache, tokens_BT, layers=(None, None)):
  """Appends tokens [B, T] (usually T = 1) at each row's length; returns (logits [B, T, Y], cache).
  `layers`: `unstacked_layers(model)`, sliced once outside a loop of steps."""
  x_BTD, cache = decode_hidden(model, cache, tokens_BT, layers)
  return model.output_logits(model.final_norm(x_BTD)), cache


def _one_layer_stack(block: Block) -> Block:
  """`block` as a stack of one layer (its parameters with a leading axis of 1), so the stacks'
  prefill and decode code caches it."""
  graphdef, state = nnx.split(block)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[None], state))


def mtp_prefill(model: Transformer, h_BTD, next_tokens_BT, lengths_B, max_len: int,
                kind: str = "latent"):
  """Runs the first MTP module over a prompt and caches its block for `max_len` positions.

  `h_BTD`: the main model's hidden states before the final norm (`prefill_hidden`); position t's
  input pairs h[t] with the embedding of `next_tokens[t]`, the token at t + 1. Returns (float32
  logits [B, T, Y] for the token at t + 2, the module's one-layer cache).
  """
  module = model.mtp[0]
  positions_BT, segment_ids_BT = _prompt_layout(lengths_B, next_tokens_BT.shape[1])
  x_BTD = module.inputs(h_BTD, model.embed(next_tokens_BT))
  x_BTD, stack, _ = _prefill_stack(_one_layer_stack(module.block), kind, x_BTD, positions_BT,
                                   segment_ids_BT, max_len)
  return model.output_logits(module.norm(x_BTD)), stack


def mtp_decode(model: Transformer, stack: LayerCache, lengths_B, h_BTD, next_tokens_BT,
               kind: str = "latent"):
  """Extends the first MTP module's cache (`mtp_prefill`) at positions lengths + [0, T); returns
  (float32 logits [B, T, Y] for the tokens two past those positions, the cache)."""
  module = model.mtp[0]
  positions_BT, mask_B1TS = _positions_and_mask(lengths_B, next_tokens_BT.shape[1],
                                                stack.first.shape[2])
  x_BTD = module.inputs(h_BTD, model.embed(next_tokens_BT))
  x_BTD, stack, _ = _decode_stack(_one_layer_stack(module.block), kind, stack, x_BTD,
                                  positions_BT, mask_B1TS)
  return model.output_logits(module.norm(x_BTD)), stack
