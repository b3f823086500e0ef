"""Memory planner: per-device bytes of a training step on a mesh, from shapes alone.

  python -m train.memory --preset=deepseek_v3_671b --mesh=data=1,fsdp=64,expert=64,tensor=4 \
      --batch_size=4096 --seq_len=4096 --remat_policy=full

Parameters, router biases, AdamW's two moments and the gradients are float32 and sharded by the
table in model/sharding.py (exact). Activations are an estimate of what the backward pass keeps per
layer under the remat policy (see `activation_bytes`); tests/test_memory.py checks both against
XLA's compiled memory analysis on small configs.
"""

from __future__ import annotations

import json
import math

import jax
from absl import app, flags
from flax import nnx

from kernels.grouped_matmul import resolve_impl as resolve_moe_impl
from model import sharding
from model.config import ModelConfig, get_preset
from model.params import abstract_model


FSDP_AXES = ("embed", "lora")  # Logical parameter axes that exist only to shard storage.


def parse_mesh(text: str) -> dict:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'expert': 1, 'tensor': 1} (dcn_* folded in)."""
  sizes = {a: 1 for a in sharding.MESH_AXES}
  for item in filter(None, text.split(",")):
    name, value = item.split("=")
    name = name.strip()
    axis = name[4:] if name.startswith("dcn_") else name
    if axis not in sizes:
      raise ValueError(f"--mesh: unknown axis {name!r}; axes are {sharding.MESH_AXES} (and dcn_*)")
    sizes[axis] *= int(value)
  return sizes


def _shard_factor(spec, sizes: dict) -> int:
  factor = 1
  for entry in spec:
    for axis in sharding.spec_axes(entry):
      factor *= sizes[axis]
  return factor


def state_bytes(cfg: ModelConfig, sizes: dict) -> dict:
  """Per-device bytes of parameters (float32), router biases and the AdamW moments, and of the
  weights FSDP gathers: one layer (of the largest kind) in the compute dtype with its FSDP axes
  gathered, twice (the layer in use and the next one prefetched, or its gradient being
  reduce-scattered)."""
  model = abstract_model(cfg)
  params = extra = 0
  gathered = {}  # Bytes of one layer with its FSDP axes gathered, by top-level module.
  compute = jax.numpy.dtype(cfg.dtype).itemsize
  for variables, kind in ((nnx.state(model, nnx.Param), "params"),
                          (nnx.state(model, nnx.Not(nnx.Param)), "extra")):
    for path, v in nnx.to_flat_state(variables):
      shape, names = v.shape, [str(p) for p in path]
      axes = sharding.param_axes(names, len(shape))
      spec = sharding.logical_to_spec(axes, shape, sizes)
      n = math.prod(shape) * v.dtype.itemsize / _shard_factor(spec, sizes)
      if kind == "params":
        params += n
        stacked = math.prod(s for s, a in zip(shape, axes) if a == "layers")
        used = tuple(None if a in FSDP_AXES else a for a in axes)  # As the matmul sees it.
        full = math.prod(shape) / _shard_factor(sharding.logical_to_spec(used, shape, sizes), sizes)
        gathered[names[0]] = gathered.get(names[0], 0) + full / stacked * compute
      else:
        extra += n
  fsdp_gathered = 2 * max(gathered.values()) if sizes.get("fsdp", 1) > 1 else 0
  return dict(params=params, extra=extra, optimizer=2 * params, fsdp_gathered=fsdp_gathered)


def _tokens_per_device(sizes: dict, batch: int, seq: int, microbatches: int) -> float:
  shards = math.prod(sizes[a] for a in sharding.LOGICAL_AXES["batch"])
  return batch // microbatches * seq / shards


def activation_bytes(cfg: ModelConfig, sizes: dict, batch: int, seq: int,
                     microbatches: int = 1) -> dict:
  """Estimated activations the backward pass holds per device, by remat policy.

  Per token and layer: attention keeps its projections (q, the latent, expanded k and v) and, on
  the "xla" reference path only, the [N, S] float32 scores (fused kernels: a log-sum-exp per
  head); the FFN its gate/up/hidden rows (K of them for routed experts, plus the dispatch
  buffers: ep x K rows when dropless, and the blocked grouped matmul's padded copies); heads and
  FFN widths divide by `tensor`. With remat "full" only each layer's input survives the forward
  pass, plus one layer's working set during its recomputation; "dots_saveable" keeps the matmul
  outputs. Every policy adds one layer's cotangents. The output head keeps float32 logits (and
  their gradient) for the main and MTP heads.
  """
  tp, ep = sizes["tensor"], sizes["expert"]
  b = jax.numpy.dtype(cfg.dtype).itemsize
  tokens = _tokens_per_device(sizes, batch, seq, microbatches)
  n = max(cfg.num_heads // tp, 1) if cfg.num_heads % tp == 0 else cfg.num_heads
  d = cfg.d_model
  if cfg.attention_type == "mla":
    rq = cfg.q_lora_rank or 0
    proj = 2 * rq + cfg.kv_lora_rank * 2 + cfg.qk_rope_head_dim + n * (
        3 * cfg.qk_head_dim + cfg.qk_nope_head_dim + 3 * cfg.v_head_dim)
    dots = rq + cfg.kv_lora_rank + cfg.qk_rope_head_dim + n * (
        cfg.qk_head_dim + cfg.qk_nope_head_dim + cfg.v_head_dim) + d
  else:
    proj = n * 6 * cfg.head_dim
    dots = n * 3 * cfg.head_dim + d
  # The reference ("xla") keeps [N, S] float32 logits, masked logits and probabilities; the
  # fused kernels (native on CPU, Pallas flash, cuDNN) and the chunked path keep one float32
  # log-sum-exp per head and recompute the rest in the backward.
  scores = 3 * n * seq * 4 if cfg.attention_impl == "xla" else n * 4
  attn_per_token = (proj + 4 * d) * b + scores

  def ffn(width, rows=1):
    return rows * (4 * width + 2 * d) * b, rows * (2 * width + d) * b

  dense, dense_dots = ffn(cfg.dense_ffn_dim // tp if cfg.dense_ffn_dim % tp == 0 else cfg.dense_ffn_dim)
  if cfg.num_experts:
    f = cfg.moe_ffn_dim // tp if cfg.moe_ffn_dim % tp == 0 else cfg.moe_ffn_dim
    k = cfg.experts_per_token
    buffer_rows = k * ep if (ep > 1 and cfg.capacity_factor is None) else k * (
        cfg.capacity_factor or 1.0) if ep > 1 else k
    routed, routed_dots = ffn(f, buffer_rows)
    # The dispatched rows (and, on the blocked XLA:CPU path, its two padded block copies: "auto"
    # plans the native kernel on CPU, without building it here); router scores in float32.
    copies = 3 if resolve_moe_impl(cfg.moe_impl, probe_native=False) == "blocked" else 1
    routed += copies * buffer_rows * d * b + 4 * cfg.num_experts * 4
    shared, shared_dots = ffn(f * cfg.num_shared_experts) if cfg.num_shared_experts else (0, 0)
    moe, moe_dots = routed + shared, routed_dots + shared_dots
  else:
    moe = moe_dots = 0
  block = {False: attn_per_token + dense, True: attn_per_token + moe}
  block_dots = {False: dots * b + dense_dots, True: dots * b + moe_dots}
  layers = [(False, cfg.num_dense_layers), (True, cfg.num_moe_layers),
            (cfg.num_experts > 0, cfg.mtp_depth)]
  one_layer = max(block[m] for m, c in layers if c)  # The cotangents of the layer in backward.
  if cfg.remat_policy == "full":  # Layer inputs, plus the layer being recomputed.
    saved = sum(c for _, c in layers) * d * b + 2 * one_layer
  elif cfg.remat_policy == "dots_saveable":
    saved = sum(c * (block_dots[m] + d * b) for m, c in layers) + 2 * one_layer
  else:
    saved = sum(c * block[m] for m, c in layers) + one_layer
  vocab = cfg.vocab_size // tp if cfg.vocab_size % tp == 0 else cfg.vocab_size
  logits = 3 * (1 + cfg.mtp_depth) * vocab * 4
  return dict(activations=tokens * (saved + logits), tokens_per_device=tokens)


def plan(cfg: ModelConfig, sizes: dict, batch: int, seq: int, microbatches: int = 1) -> dict:
  """Per-device bytes: params, extra, optimizer, gradients, activations, batch, total."""
  out = state_bytes(cfg, sizes)
  out["gradients"] = out["params"] * (2 if microbatches > 1 else 1)  # Plus the accumulator.
  out.update(activation_bytes(cfg, sizes, batch, seq, microbatches))
  batch_shards = math.prod(sizes[a] for a in sharding.LOGICAL_AXES["batch"])
  out["batch"] = 5 * batch * seq * 4 / batch_shards  # inputs, targets, segments, positions, mask.
  out["total"] = sum(out[k] for k in ("params", "extra", "optimizer", "gradients", "fsdp_gathered",
                                      "activations", "batch"))
  return out


def _define_flags():
  """The CLI's flags, registered only when run as a program (importing stays flag-free)."""
  flags.DEFINE_string("preset", "deepseek_v3_671b", "model.config preset.")
  flags.DEFINE_string("mesh", "data=1,fsdp=64,expert=64,tensor=4",
                      "Axis sizes, e.g. data=2,fsdp=8,expert=8,tensor=4 (dcn_* multiply).")
  flags.DEFINE_integer("batch_size", 4096, "Global batch (sequences).")
  flags.DEFINE_integer("seq_len", 4096, "Sequence length.")
  flags.DEFINE_integer("microbatches", 1, "Gradient-accumulation micro-batches.")
  flags.DEFINE_string("remat_policy", "full", "none, full or dots_saveable.")
  flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters stay float32).")
  flags.DEFINE_float("capacity_factor", 0.0, "Expert-parallel buffers; 0: dropless.")


def main(argv):
  """Prints the per-device memory plan of --preset on --mesh as one JSON object."""
  del argv
  f = flags.FLAGS
  cfg = get_preset(f.preset).replace(remat_policy=f.remat_policy, dtype=f.dtype,
                                     capacity_factor=f.capacity_factor or None)
  sizes = parse_mesh(f.mesh)
  result = plan(cfg, sizes, f.batch_size, f.seq_len, f.microbatches)
  gib = {k + "_gib": round(v / 2**30, 2) for k, v in result.items() if k != "tokens_per_device"}
  print(json.dumps(dict(preset=f.preset, mesh=sizes, devices=math.prod(sizes.values()),
                        batch_size=f.batch_size, seq_len=f.seq_len, microbatches=f.microbatches,
                        remat_policy=f.remat_policy, dtype=f.dtype,
                        capacity_factor=cfg.capacity_factor,
                        tokens_per_device=result["tokens_per_device"], **gib)))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
