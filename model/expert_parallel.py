"""Expert parallelism: one `shard_map` block that moves tokens to the devices holding their experts.

Inside the block every device holds a slice of the tokens (the batch axes) and, when the experts
are sharded over `expert`, E / ep of the experts. Each token's assignments are packed into one
fixed-size buffer per destination device, exchanged with `all_to_all`, multiplied locally with the
grouped matmul, sent back with a second `all_to_all` and combined with the gate weights. The
`all_to_all` buffers have a static size: `slots` assignments per (source, destination) pair;
dropless (capacity_factor None) uses slots = local tokens x K, which can never overflow, and the
empty slots cost no expert FLOPs (they belong to no group). Overflowing assignments are dropped and
counted. Where the backend has `ragged_all_to_all` (TPU/GPU; not XLA:CPU in jax 0.10.2)
`moe_dispatch="ragged"` sends only the rows that exist.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.backend import on_accelerator
from model.moe_dispatch import combine, grouped_swiglu, sort_assignments, unsort
from model.sharding import logical_to_spec, spec_axes


def dispatch_slots(tokens: int, k: int, ep: int, capacity_factor: Optional[float]) -> int:
  """Buffer rows per destination device: all T*K (dropless), else ceil(T*K/ep * factor)."""
  if capacity_factor is None:
    return tokens * k
  return min(tokens * k, math.ceil(tokens * k / ep * capacity_factor))


def _expert_ffn(rows_MD, local_expert_M, e_local, w_gate_EDF, w_up_EDF, w_down_EFD, impl):
  """SwiGLU of each received row with its local expert; rows with expert -1 are padding: they
  belong to no group, sort last and cost nothing (output 0)."""
  key_M1 = jnp.where(local_expert_M >= 0, local_expert_M, e_local)[:, None]
  d = sort_assignments(key_M1, e_local)
  out = grouped_swiglu(d.rows(rows_MD), d.sizes, w_gate_EDF, w_up_EDF, w_down_EFD, impl)
  return unsort(out, d)[:, 0]


def _all_to_all_ffn(x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                    axis: str, ep: int, slots: int, impl: str):
  """Per-device body: pack by destination, all_to_all, local experts, all_to_all back, combine."""
  e_local = w_gate_EDF.shape[0]
  d = sort_assignments(experts_TK, ep, e_local)  # Experts lie contiguously per device.
  slot, kept = d.slots(slots)
  send_XCD = jnp.zeros((ep, slots, x_TD.shape[-1]), x_TD.dtype).at[d.group, slot].set(
      d.rows(x_TD), mode="drop")
  send_XC = jnp.full((ep, slots), -1, jnp.int32).at[d.group, slot].set(
      d.expert % e_local, mode="drop")
  recv_XCD = jax.lax.all_to_all(send_XCD, axis, 0, 0)
  recv_XC = jax.lax.all_to_all(send_XC, axis, 0, 0)
  out_MD = _expert_ffn(recv_XCD.reshape(ep * slots, -1), recv_XC.reshape(-1), e_local,
                       w_gate_EDF, w_up_EDF, w_down_EFD, impl)
  back_XCD = jax.lax.all_to_all(out_MD.reshape(recv_XCD.shape), axis, 0, 0)
  y_sorted = back_XCD.at[d.group, slot].get(mode="fill", fill_value=0)
  dropped = (kept.size - kept.sum()).astype(jnp.int32)
  return combine(y_sorted, d, weights_TK, x_TD.dtype), dropped


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` (one slice per peer) from `all_to_all` over padded chunks, for
  backends without the collective (XLA:CPU): same arguments, same result."""
  n, tail = operand.shape[0], (1,) * (operand.ndim - 1)
  rows = jnp.arange(n)
  valid_XN = rows[None, :] < send_sizes[:, None]
  chunks = operand[jnp.clip(input_offsets[:, None] + rows[None, :], 0, n - 1)]
  chunks = jnp.where(valid_XN.reshape(valid_XN.shape + tail), chunks, 0)
  received = jax.lax.all_to_all(chunks, axis_name, 0, 0)  # [source, n, ...]
  starts = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # Ours, per source.
  dest = jnp.where(rows[None, :] < recv_sizes[:, None], starts[:, None] + rows[None, :],
                   output.shape[0])  # Out of bounds: not written.
  return output.at[dest.reshape(-1)].set(received.reshape((-1,) + operand.shape[1:]), mode="drop")


def _ragged_ffn(x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, axis: str,
                ep: int, rows: int, impl: str, collective):
  """Per-device body with ragged exchanges: each destination gets exactly the rows meant for it,
  packed after the other sources' rows in a `rows`-row buffer; what does not fit is dropped."""
  t, k = experts_TK.shape
  e_local = w_gate_EDF.shape[0]
  d = sort_assignments(experts_TK, ep, e_local)
  counts_XX = jax.lax.all_gather(d.sizes, axis)  # [source, destination] assignments.
  me = jax.lax.axis_index(axis)
  sent_from_XX = jnp.cumsum(counts_XX, 1) - counts_XX  # Sources' offsets in their sorted rows.
  placed_at_XX = jnp.cumsum(counts_XX, 0) - counts_XX  # Offsets in the destinations' buffers.
  kept_XX = jnp.clip(rows - placed_at_XX, 0, counts_XX)  # The first rows of a chunk that fit.
  send, recv = kept_XX[me], kept_XX[:, me]
  there = (sent_from_XX[me], send, placed_at_XX[me], recv)
  recv_RD = collective(d.rows(x_TD), jnp.zeros((rows, x_TD.shape[-1]), x_TD.dtype), *there,
                       axis_name=axis)
  recv_R = collective((d.expert % e_local).astype(jnp.int32), jnp.full((rows,), -1, jnp.int32),
                      *there, axis_name=axis)
  out_RD = _expert_ffn(recv_RD, recv_R, e_local, w_gate_EDF, w_up_EDF, w_down_EFD, impl)
  y_sorted = collective(out_RD, jnp.zeros((t * k, x_TD.shape[-1]), out_RD.dtype),
                        placed_at_XX[:, me], recv, sent_from_XX[:, me], send, axis_name=axis)
  dropped = (t * k - send.sum()).astype(jnp.int32)
  return combine(y_sorted, d, weights_TK, x_TD.dtype), dropped


DISPATCHES = ("auto", "all_to_all", "ragged")


def sharded_moe_ffn(x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, mesh, *,
                    local_ffn: Callable, capacity_factor: Optional[float], impl: str = "auto",
                    dispatch: str = "auto"):
  """The routed experts over `mesh`: tokens stay on their devices, experts on theirs.

  Tokens are split over the batch axes; expert weights over `expert` (E) and `tensor` (F), gathered
  over `fsdp`. Without expert sharding each device runs `local_ffn` (the single-device dropless or
  capacity path) on its own tokens. Returns (y [T, D], dropped assignments, summed over devices).

  `dispatch`: "all_to_all" exchanges fixed [ep, slots] buffers; "ragged" sends only the rows in
  use with `ragged_all_to_all` into a buffer of ep x slots rows (emulated where the backend lacks
  the collective, as XLA:CPU does); "auto" is "ragged" on TPU/GPU and "all_to_all" elsewhere.
  """
  if dispatch not in DISPATCHES:
    raise ValueError(f"sharded_moe_ffn: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
  native = on_accelerator()
  if dispatch == "auto":
    dispatch = "ragged" if native else "all_to_all"
  collective = jax.lax.ragged_all_to_all if native else emulated_ragged_all_to_all
  tok = logical_to_spec(("batch", None), x_TD.shape, mesh)
  w_in = logical_to_spec(("experts", None, "expert_mlp"), w_gate_EDF.shape, mesh)
  w_out = logical_to_spec(("experts", "expert_mlp", None), w_down_EFD.shape, mesh)
  token_axes = spec_axes(tok[0] if len(tok) else None)
  expert_axes = spec_axes(w_in[0] if len(w_in) else None)
  tensor_axes = spec_axes(w_in[2] if len(w_in) > 2 else None)
  ep = math.prod(dict(mesh.shape)[a] for a in expert_axes)

  def body(x, experts, weights, wg, wu, wd):
    if expert_axes:
      slots = dispatch_slots(x.shape[0], experts.shape[1], ep, capacity_factor)
      if dispatch == "ragged":
        y, dropped = _ragged_ffn(x, experts, weights, wg, wu, wd, axis=expert_axes[0], ep=ep,
                                 rows=ep * slots, impl=impl, collective=collective)
      else:
        y, dropped = _all_to_all_ffn(x, experts, weights, wg, wu, wd, axis=expert_axes[0], ep=ep,
                                     slots=slots, impl=impl)
    else:
      y, dropped = local_ffn(x, experts, weights, wg, wu, wd)
    if tensor_axes:  # Each device summed over its slice of F: add the partial outputs.
      y = jax.lax.psum(y, tensor_axes)
    if token_axes:
      dropped = jax.lax.psum(dropped, token_axes)
    return y, dropped

  # Unchecked: Pallas grouped matmuls carry no varying-axes types. The transpose is still exact:
  # replicated inputs' cotangents are summed over the axes that replicate them.
  return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                       out_specs=(tok, P()), check_vma=False)(
                           x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
