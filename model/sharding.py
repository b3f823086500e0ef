"""Sharding in one place: the device mesh, the logical-axis table, parameter axes, `constrain`.

Every parameter and activation axis has a logical name ("embed", "heads", "experts", ...);
`LOGICAL_AXES` maps each name onto the mesh axes `data`, `fsdp`, `expert`, `tensor`. Parameters get
their logical names from `PARAM_AXES`, keyed by their path in the model, so module code stays free of
sharding. Without a mesh in context (`jax.set_mesh`) every helper here is a no-op.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # Outermost (slowest network) first.

# Logical axis -> mesh axes (a tuple shards over their product; None replicates).
LOGICAL_AXES = {
    "batch": ("data", "fsdp", "expert"),  # Tokens: every axis but tensor splits the batch.
    # Parameters' d_model axis: FSDP (ZeRO-3), gathered before use. Over `expert` too: weights
    # outside the experts would otherwise be replicated along it (on an expert weight the
    # `experts` axis has taken it already).
    "embed": ("fsdp", "expert"),
    "lora": "fsdp",  # MLA's latent rank (the up-projections have no d_model axis).
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",  # Dense and shared-expert FFN width.
    "experts": "expert",
    "expert_mlp": "tensor",  # Routed-expert FFN width.
    "layers": None,  # The stacked-layer axis of scanned blocks.
    "seq": None,
    "act_embed": None,  # Activations' d_model axis.
}

# Parameter path suffix -> logical axes of the (unstacked) parameter; leading stacked axes get
# "layers". Every parameter must match exactly one entry (tests check it).
PARAM_AXES = {
    "embed/embedding": ("vocab", "embed"),
    "head/w": ("embed", "vocab"),
    "attn/q/w": ("embed", "heads", None),
    "attn/q_a/w": ("embed", None),
    "attn/q_b/w": ("lora", "heads", None),
    "attn/kv_a/w": ("embed", None),
    "attn/kv_b/w": ("lora", "heads", None),
    "attn/k/w": ("embed", "kv_heads", None),
    "attn/v/w": ("embed", "kv_heads", None),
    "attn/o/w": ("heads", None, "embed"),
    "gate/w": ("embed", "mlp"),
    "up/w": ("embed", "mlp"),
    "down/w": ("mlp", "embed"),
    "router/w": ("embed", None),
    "router/bias": (None,),
    "ffn/w_gate": ("experts", "embed", "expert_mlp"),
    "ffn/w_up": ("experts", "embed", "expert_mlp"),
    "ffn/w_down": ("experts", "expert_mlp", "embed"),
    "proj/w": (None, "embed"),  # MTP's [2D, D] projection.
    "scale": (None,),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes within a slice (one may be -1: the rest of the devices) and across slices.

  `dcn_*` sizes multiply the axis over the data-centre network (multi-slice TPU pods, or processes
  on CPU/GPU clusters); 1 everywhere means one slice.
  """

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_expert: int = 1
  dcn_tensor: int = 1

  def ici_shape(self, num_devices: int) -> tuple[int, ...]:
    """Per-slice axis sizes with the -1 resolved against `num_devices` per slice."""
    sizes = [getattr(self, a) for a in MESH_AXES]
    if sizes.count(-1) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
      raise ValueError(f"MeshConfig {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} "
                       "devices per slice")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
      raise ValueError(f"MeshConfig {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices "
                       f"per slice, but there are {num_devices}; set one axis to -1")
    return tuple(sizes)

  def dcn_shape(self) -> tuple[int, ...]:
    return tuple(getattr(self, "dcn_" + a) for a in MESH_AXES)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The 4-axis mesh over `devices` (default: all), with Auto axis types (GSPMD propagation).

  With any dcn size > 1 the mesh is hybrid: slices (TPU `slice_index`, else processes) are laid
  along the dcn axes and the devices of one slice along the ici axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = cfg.dcn_shape()
  slices = math.prod(dcn)
  if len(devices) % slices:
    raise ValueError(f"MeshConfig dcn sizes {dcn} do not divide {len(devices)} devices")
  ici = cfg.ici_shape(len(devices) // slices)
  from jax.experimental import mesh_utils
  if slices > 1:
    by_process = len({getattr(d, "slice_index", 0) for d in devices}) != slices
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                 process_is_granule=by_process,
                                                 allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    array = np.asarray(devices).reshape(ici)
  return Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _mesh_sizes(mesh) -> dict:
  """Axis sizes of a Mesh, an AbstractMesh, or a plain {axis: size} dict (for planning)."""
  return dict(mesh) if isinstance(mesh, dict) else dict(mesh.shape)


def logical_to_spec(logical: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
                    mesh=None) -> P:
  """PartitionSpec for an array whose axes have these logical names.

  With `shape` and `mesh` (or a dict of axis sizes), mesh axes that are absent, of size 1, already used by an earlier axis,
  or that do not divide the dimension are dropped (that dimension is then less sharded).
  """
  sizes = _mesh_sizes(mesh) if mesh is not None else None
  used, spec = set(), []
  for i, name in enumerate(logical):
    if name is not None and name not in LOGICAL_AXES:
      raise KeyError(f"unknown logical axis {name!r}; known: {sorted(LOGICAL_AXES)}")
    target = LOGICAL_AXES.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept, product = [], 1
    for a in axes:
      if a in used:
        continue
      if sizes is not None:
        if sizes.get(a, 1) == 1 or (shape is not None and shape[i] % (product * sizes[a])):
          continue
        product *= sizes[a]
      kept.append(a)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def current_mesh():
  """The abstract mesh set by `jax.set_mesh`, or None when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def is_split(logical: str, size: int) -> bool:
  """Whether an axis of this logical name and size is split over the current mesh."""
  mesh = current_mesh()
  return mesh is not None and logical_to_spec((logical,), (size,), mesh) != P()


def constrain(x: jax.Array, *logical: Optional[str]) -> jax.Array:
  """`with_sharding_constraint` of `x` to its logical axes; a no-op without a mesh in context."""
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return x
  if len(logical) != x.ndim:
    raise ValueError(f"constrain: {len(logical)} logical axes for an array of shape {x.shape}")
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


def param_axes(path: Sequence[str], ndim: int) -> tuple[Optional[str], ...]:
  """Logical axes of the parameter at `path` ("moe_layers/ffn/w_gate" as a sequence of names)."""
  joined = "/".join(str(p) for p in path)
  matches = [s for s in PARAM_AXES if joined == s or joined.endswith("/" + s)]
  if len(matches) != 1:
    raise KeyError(f"parameter {joined!r} matches {matches or 'no'} entries of "
                   "model.sharding.PARAM_AXES; add one")
  axes = PARAM_AXES[matches[0]]
  extra = ndim - len(axes)
  if extra < 0:
    raise ValueError(f"parameter {joined!r} has {ndim} axes, PARAM_AXES names {len(axes)}")
  return ("layers",) * extra + tuple(axes)


def dict_path(path) -> tuple[str, ...]:
  """The dict keys along a pytree key path, as strings."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def tree_specs(tree, mesh, param_paths: set):
  """PartitionSpecs for every leaf of `tree` (pure dicts of parameters, optimizer state, ...).

  A leaf whose dict-key path ends in one of `param_paths` (the parameters themselves, Adam's mu
  and nu, gradients) is sharded like that parameter; everything else (step counters, scalars) is
  replicated.
  """
  def spec(path, leaf):
    names = dict_path(path)
    shape = getattr(leaf, "shape", ())
    suffix = next((names[i:] for i in range(len(names)) if names[i:] in param_paths), None)
    if suffix is None or not shape:
      return P()
    return logical_to_spec(param_axes(suffix, len(shape)), shape, mesh)
  return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree, mesh: Mesh, param_paths: set):
  """NamedShardings for every leaf of `tree` (see `tree_specs`)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, mesh, param_paths),
                      is_leaf=lambda x: isinstance(x, P))


def spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_spec(ndim: int, mesh=None, batch_size: Optional[int] = None) -> P:
  """Spec of a [B, ...] input batch array: B over the batch axes, the rest replicated."""
  shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
  return logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, mesh)


def per_device_attention(attention_fn, q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, *args, **kwargs):
  """`attention_fn(q, k, v, segment_ids, ...)` run on each device's own rows and heads.

  Under a mesh the call sits in a `shard_map` with the batch over the batch axes and the heads over
  `tensor`: attention needs no communication then, and Pallas kernels (which XLA cannot partition)
  see only local shapes. Queries and keys may be (nope, rope) pairs (kernels.attention); a rotary
  key shared by every head (one head) is split over the batch only. When some mesh axis would not
  split the work (heads not divisible by `tensor`, a batch too small) the call is left to XLA's
  partitioner with `impl="xla"`: a kernel there would run whole, on gathered operands, on every
  device.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return attention_fn(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, *args, **kwargs)
  n = v_BSNV.shape[2]
  heads = lambda x: logical_to_spec(("batch", None, "heads", None), x.shape, mesh)
  shared = lambda x: logical_to_spec(("batch", None, None, None), x.shape, mesh)
  rows = logical_to_spec(("batch", None), (v_BSNV.shape[0], 1), mesh)
  out_spec = heads(jax.ShapeDtypeStruct(v_BSNV.shape, v_BSNV.dtype))
  used = {a for entry in out_spec for a in spec_axes(entry)}
  per_head = [x for x in jax.tree.leaves((q_BTNH, k_BSNH, v_BSNV)) if x.shape[2] == n]
  if (any(heads(x) != out_spec for x in per_head)
      or any(size > 1 and a not in used for a, size in dict(mesh.shape).items())):
    # Some device would hold a replica: leave the partitioning to XLA, on the XLA reference.
    kwargs = dict(kwargs, impl="xla") if "impl" in kwargs else kwargs
    return attention_fn(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, *args, **kwargs)
  body = lambda q, k, v, *seg: attention_fn(q, k, v, seg[0] if seg else None, *args, **kwargs)
  operands = (q_BTNH, k_BSNH, v_BSNV) + (() if segment_ids_BT is None else (segment_ids_BT,))
  specs = jax.tree.map(lambda x: heads(x) if x.shape[2] == n else shared(x),
                       (q_BTNH, k_BSNH, v_BSNV))
  specs = specs + (() if segment_ids_BT is None else (rows,))
  # Every mesh axis splits the operands (no replicas), so the unchecked transpose is exact; Pallas
  # calls carry no varying-axes types.
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_spec,
                       check_vma=False)(*operands)
