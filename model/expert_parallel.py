"""Expert parallelism: one `shard_map` block that moves tokens to the devices holding their experts.

Inside the block every device holds a slice of the tokens (the batch axes) and, when the experts
are sharded over `expert`, E / ep of the experts. Each token's assignments are packed into one
fixed-size buffer per destination device, exchanged with `all_to_all`, multiplied locally with the
grouped matmul, sent back with a second `all_to_all` and combined with the gate weights. XLA:CPU
has no `ragged_all_to_all` (jax 0.10.2), so the buffers have a static size: `slots` assignments per
(source, destination) pair; dropless (capacity_factor None) uses slots = local tokens x K, which
can never overflow. Overflowing assignments are dropped and counted.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.grouped_matmul import grouped_matmul
from model.sharding import logical_to_spec, spec_axes


def dispatch_slots(tokens: int, k: int, ep: int, capacity_factor: Optional[float]) -> int:
  """Buffer rows per destination device: all T*K (dropless), else ceil(T*K/ep * factor)."""
  if capacity_factor is None:
    return tokens * k
  return min(tokens * k, math.ceil(tokens * k / ep * capacity_factor))


def _expert_ffn(rows_MD, local_expert_M, e_local, w_gate_EDF, w_up_EDF, w_down_EFD, impl):
  """SwiGLU of each row with its local expert; rows with expert -1 are padding (output 0)."""
  m = rows_MD.shape[0]
  key_M = jnp.where(local_expert_M >= 0, local_expert_M, e_local)  # Padding sorts last.
  order = jnp.argsort(key_M, stable=True)
  sizes_E = jnp.zeros((e_local,), jnp.int32).at[key_M].add(1, mode="drop")
  sizes_E = sizes_E.at[-1].add(m - sizes_E.sum())  # Padding rows (zeros) join the last group.
  rows = rows_MD[order]
  h = (jax.nn.silu(grouped_matmul(rows, w_gate_EDF, sizes_E, impl))
       * grouped_matmul(rows, w_up_EDF, sizes_E, impl))
  out = grouped_matmul(h, w_down_EFD, sizes_E, impl)
  return jnp.zeros_like(out).at[order].set(out)


def _all_to_all_ffn(x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                    axis: str, ep: int, slots: int, impl: str):
  """Per-device body: pack by destination, all_to_all, local experts, all_to_all back, combine."""
  t, k = experts_TK.shape
  e_local = w_gate_EDF.shape[0]
  order = jnp.argsort(experts_TK.reshape(-1), stable=True)
  expert_sorted = experts_TK.reshape(-1)[order]
  dest_sorted = expert_sorted // e_local  # Experts are laid out contiguously per device.
  per_dest = jnp.zeros((ep,), jnp.int32).at[dest_sorted].add(1)
  rank_sorted = jnp.arange(t * k) - (jnp.cumsum(per_dest) - per_dest)[dest_sorted]
  kept = rank_sorted < slots
  slot_sorted = jnp.where(kept, rank_sorted, slots)  # Out of bounds: dropped by the scatter.
  send_XCD = jnp.zeros((ep, slots, x_TD.shape[-1]), x_TD.dtype).at[dest_sorted, slot_sorted].set(
      x_TD[order // k], mode="drop")
  send_XC = jnp.full((ep, slots), -1, jnp.int32).at[dest_sorted, slot_sorted].set(
      expert_sorted % e_local, mode="drop")
  recv_XCD = jax.lax.all_to_all(send_XCD, axis, 0, 0)
  recv_XC = jax.lax.all_to_all(send_XC, axis, 0, 0)
  out_MD = _expert_ffn(recv_XCD.reshape(ep * slots, -1), recv_XC.reshape(-1), e_local,
                       w_gate_EDF, w_up_EDF, w_down_EFD, impl)
  back_XCD = jax.lax.all_to_all(out_MD.reshape(recv_XCD.shape), axis, 0, 0)
  y_sorted = back_XCD.at[dest_sorted, slot_sorted].get(mode="fill", fill_value=0)
  y_TKD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
  y_TD = jnp.einsum("TKD,TK->TD", y_TKD.astype(jnp.float32), weights_TK)
  return y_TD.astype(x_TD.dtype), (t * k - kept.sum()).astype(jnp.int32)


def sharded_moe_ffn(x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, mesh, *,
                    local_ffn: Callable, capacity_factor: Optional[float], impl: str = "auto"):
  """The routed experts over `mesh`: tokens stay on their devices, experts on theirs.

  Tokens are split over the batch axes; expert weights over `expert` (E) and `tensor` (F), gathered
  over `fsdp`. Without expert sharding each device runs `local_ffn` (the single-device dropless or
  capacity path) on its own tokens. Returns (y [T, D], dropped assignments, summed over devices).
  """
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
