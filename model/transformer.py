"""The decoder: embedding -> dense blocks -> MoE blocks -> norm -> head, plus multi-token prediction.

Layers of one kind are stacked along a leading axis and run with `jax.lax.scan`, so compile time
does not grow with depth (a 61-layer model traces two block bodies); short stacks on CPU run as
an unrolled loop instead (ModelConfig.layer_loop).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.attention import make_attention
from kernels.backend import on_accelerator
from model.config import UNROLL_UP_TO, ModelConfig
from model.layers import MLP, Einsum, Embed, RMSNorm, compute_dtype
from model.moe import MoE, RouterStats
from model.sharding import constrain


class ModelOutput(NamedTuple):
  """What a forward pass returns; nothing is written back into the module."""

  logits: jax.Array  # [B, T, Y] float32.
  mtp_logits: Optional[jax.Array]  # [depth, B, T, Y] float32: depth d predicts token t + 1 + d.
  router: Optional[RouterStats]  # Stacked over MoE layers: main-model layers first, then MTP blocks.
  hidden: Optional[jax.Array] = None  # [B, T, D] final hidden states (after the final norm): what
  # reward and value heads read.


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
    dt = compute_dtype(cfg)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dt)
    self.attn = make_attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dt)
    self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.dense_ffn_dim, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, replay_BTK=None):
    with jax.named_scope("attention"):  # Names the ops in profiles and dumped HLO.
      x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
    return self.feed_forward(x_BTD, replay_BTK)

  def feed_forward(self, x_BTD, replay_BTK=None):
    """The second residual half, x + ffn(norm(x)): (x, router stats or None). `replay_BTK`:
    recorded experts for an MoE block (routing replay)."""
    if isinstance(self.ffn, MoE):
      with jax.named_scope("moe"):
        y_BTD, stats = self.ffn(self.ffn_norm(x_BTD), replay_BTK)
      return x_BTD + y_BTD, stats
    with jax.named_scope("mlp"):
      return x_BTD + self.ffn(self.ffn_norm(x_BTD)), None


def stacked_blocks(cfg: ModelConfig, moe: bool, count: int, rngs: nnx.Rngs) -> Optional[Block]:
  """`count` blocks with independent initialisations, stacked along a leading layer axis.

  The stacked initialisation runs as one jitted, vmapped function: run eagerly, every
  initialiser would compile on its own.
  """
  if count == 0:
    return None
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, moe, rngs=nnx.Rngs(0))))

  @jax.jit
  def create(key):
    make = lambda k: nnx.state(Block(cfg, moe, rngs=nnx.Rngs(params=k)))
    return jax.vmap(make)(jax.random.split(key, count))

  return nnx.merge(graphdef, create(rngs.params()))


_REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
          "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def scans_layers(cfg: ModelConfig, num_layers: int) -> bool:
  """Whether a stack of `num_layers` layers runs as a `jax.lax.scan` (`cfg.layer_loop`)."""
  if cfg.layer_loop == "auto":  # Remat asks for the scan's layer-by-layer memory bound.
    return on_accelerator() or num_layers > UNROLL_UP_TO or cfg.remat_policy != "none"
  return cfg.layer_loop == "scan"


def run_stacked(blocks: Optional[Block], x_BTD, positions_BT, segment_ids_BT, remat_policy="none",
                replay_LBTK=None):
  """Runs `x` through stacked blocks; returns (x, per-layer stats stacked, or None).

  A `jax.lax.scan` or an unrolled loop over the layers (`scans_layers`). With a remat policy each
  block's activations are recomputed in the backward pass, except what the policy saves.
  `replay_LBTK`: recorded experts per layer (MoE stacks; routing replay).
  """
  if blocks is None:
    return x_BTD, None
  graphdef, state = nnx.split(blocks)
  num_layers = jax.tree.leaves(state)[0].shape[0]

  def body(h_BTD, xs):
    layer_state, replay_BTK = xs
    h_BTD = constrain(h_BTD, "batch", "seq", "act_embed")  # The residual stream: batch-sharded.
    return nnx.merge(graphdef, layer_state)(h_BTD, positions_BT, segment_ids_BT, replay_BTK)

  if remat_policy != "none":
    body = jax.checkpoint(body, policy=_REMAT[remat_policy])
  if scans_layers(blocks.attn.cfg, num_layers):
    return jax.lax.scan(body, x_BTD, (state, replay_LBTK))
  # Unrolled: each layer's residuals are buffers of their own, not slices of stacked ones.
  stats = []
  for layer in range(num_layers):
    x_BTD, layer_stats = body(x_BTD, jax.tree.map(lambda a: a[layer], (state, replay_LBTK)))
    stats.append(layer_stats)
  if stats[0] is None:
    return x_BTD, None
  return x_BTD, jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *stats)


class MTPModule(nnx.Module):
  """One multi-token-prediction depth: project [norm(embed(next token)); norm(h)], one block, norm.

  The embedding and the output head are the main model's. The concatenation order (embedding
  first) follows DeepSeek's released MTP weights (`enorm`, `hnorm`, `eh_proj`).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = compute_dtype(cfg)
    self.embed_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dt)
    self.hidden_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dt)
    self.proj = Einsum("BTF,FD->BTD", (2 * cfg.d_model, cfg.d_model), cfg, rngs=rngs)
    self.block = Block(cfg, moe=cfg.num_experts > 0, rngs=rngs)
    self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dt)

  def inputs(self, h_BTD, next_embed_BTD):
    """The block's input: the projected [norm(embedding of the next token); norm(h)]."""
    return self.proj(jnp.concatenate([self.embed_norm(next_embed_BTD), self.hidden_norm(h_BTD)],
                                     -1))

  def __call__(self, h_BTD, next_embed_BTD, positions_BT, segment_ids_BT):
    return self.block(self.inputs(h_BTD, next_embed_BTD), positions_BT, segment_ids_BT)


def _concat_stats(parts):
  parts = [p for p in parts if p is not None]
  if not parts:
    return None
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


class Transformer(nnx.Module):
  """DeepSeek-style decoder-only language model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs=rngs)
    self.dense_layers = stacked_blocks(cfg, False, cfg.num_dense_layers, rngs)
    self.moe_layers = stacked_blocks(cfg, True, cfg.num_moe_layers, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, compute_dtype(cfg))
    self.head = (None if cfg.tie_embeddings else
                 Einsum("BTD,DY->BTY", (cfg.d_model, cfg.vocab_size), cfg, rngs=rngs))
    self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.mtp_depth)])

  def output_logits(self, h_BTD: jax.Array) -> jax.Array:
    """The shared output head (after the caller's final norm), in float32."""
    with jax.named_scope("output_head"):
      logits = self.embed.attend(h_BTD) if self.head is None else self.head(h_BTD)
    return constrain(logits.astype(jnp.float32), "batch", "seq", "vocab")

  def blocks(self, x_BTD, positions_BT, segment_ids_BT, replay_LBTK=None):
    """Runs embeddings [B, T, D] through every block: last hidden states (before the final norm)
    and the MoE layers' router stats. `replay_LBTK`: recorded experts of the MoE layers."""
    remat = self.cfg.remat_policy
    x_BTD, _ = run_stacked(self.dense_layers, x_BTD, positions_BT, segment_ids_BT, remat)
    return run_stacked(self.moe_layers, x_BTD, positions_BT, segment_ids_BT, remat, replay_LBTK)

  def __call__(self, tokens_BT: jax.Array, positions_BT: Optional[jax.Array] = None,
               segment_ids_BT: Optional[jax.Array] = None,
               replay_LBTK: Optional[jax.Array] = None, mtp: bool = True) -> ModelOutput:
    """Logits for int tokens [B, T]; positions default to 0..T-1, segments to one document per row.
    `replay_LBTK` (routing replay): experts [moe layers, B, T, K] the main model's MoE layers use
    instead of routing (entries < 0: route as usual), e.g. those the sampler recorded.
    `mtp=False` skips the MTP modules (no mtp_logits, and router statistics of the main layers
    only): a caller that reads only the next-token logits saves their forward."""
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((b, t), jnp.int32)
    h, stats = self.blocks(self.embed(tokens_BT), positions_BT, segment_ids_BT, replay_LBTK)
    hidden_BTD = self.final_norm(h)
    logits = self.output_logits(hidden_BTD)
    mtp_logits, all_stats = [], [stats]
    for depth, module in enumerate(self.mtp if mtp else (), start=1):
      next_tokens = jnp.pad(tokens_BT[:, depth:], ((0, 0), (0, depth)))
      h, mtp_stats = module(h, self.embed(next_tokens), positions_BT, segment_ids_BT)
      mtp_logits.append(self.output_logits(module.norm(h)))
      if mtp_stats is not None:
        all_stats.append(jax.tree.map(lambda x: x[None], mtp_stats))
    return ModelOutput(
        logits=logits,
        mtp_logits=jnp.stack(mtp_logits) if mtp_logits else None,
        router=_concat_stats(all_stats),
        hidden=hidden_BTD)


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model with `ShapeDtypeStruct` leaves in place of arrays (no memory)."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def with_config(model: Transformer, cfg: ModelConfig) -> Transformer:
  """`model`'s weights under `cfg`, a config with the same weight shapes (another dtype, remat,
  kernel, capacity factor): the arrays are shared, not copied."""
  graphdef = nnx.graphdef(abstract_model(cfg))
  return nnx.merge(graphdef, nnx.state(model))


def inference_model(model: Transformer) -> Transformer:
  """The model as generation and evaluation run it: dropless MoE (a capacity limit would make a
  token's output depend on the other tokens of the batch)."""
  if model.cfg.capacity_factor is None:
    return model
  return with_config(model, model.cfg.replace(capacity_factor=None))


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A freshly initialised model, drawn by one jitted function.

  The distributions are those the modules use (normal(0, init_std) matrices, unit norm scales,
  zero router biases), but all matrices come from a single normal draw sliced into place: XLA:CPU
  compiles one random op per distinct shape slowly (about a second each), so per-module
  initialisation of a tiny model takes ~30 s to compile where this takes ~2 s.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))
  flat = nnx.to_flat_state(abstract)
  matrices = [(path, v) for path, v in flat if isinstance(v, nnx.Param) and path[-1] != "scale"]
  sizes = [int(np.prod(v.shape)) for _, v in matrices]
  offsets = np.concatenate([[0], np.cumsum(sizes)])

  @jax.jit
  def draw():
    values = jax.random.normal(jax.random.key(seed), (int(offsets[-1]),), jnp.float32) * cfg.init_std
    return [values[offsets[i]:offsets[i + 1]].reshape(v.shape) for i, (_, v) in enumerate(matrices)]

  drawn = dict(zip([p for p, _ in matrices], draw()))
  for path, variable in flat:
    if path in drawn:
      variable.set_value(drawn[path])
    elif path[-1] == "scale":
      variable.set_value(jnp.ones(variable.shape, jnp.float32))
    else:
      variable.set_value(jnp.zeros(variable.shape, variable.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@nnx.jit
def forward(model: Transformer, tokens_BT, positions_BT=None, segment_ids_BT=None,
            replay_LBTK=None) -> ModelOutput:
  """`model(tokens, positions, segment_ids, replay)`, jitted (eager NNX calls retrace every scan)."""
  return model(tokens_BT, positions_BT, segment_ids_BT, replay_LBTK)
