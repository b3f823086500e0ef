"""Grouped matmul for MoE: lhs [M, K] sorted by group, rhs [G, K, N], group sizes [G] -> [M, N].

Implementations, chosen by `impl`:
  "pallas"  the Pallas kernel (`kernels.grouped_matmul_pallas`), custom VJP with the transposed
            grouped matmul for the weight gradient, tiles (tm, tk, tn) configurable; a grid that
            suits the backend (owned output tiles on GPU, revisited ones on TPU); interpreted
            off TPU/GPU (for tests).
  "xla"     XLA's best exact path on this backend: "ragged" on TPU/GPU, "blocked" elsewhere.
  "ragged"  `jax.lax.ragged_dot`: XLA's grouped matmul on TPU/GPU. On CPU (jax 0.10.2) XLA lowers it
            to a masked dense dot over every group, G times the FLOPs.
  "blocked" rows padded per group to whole blocks, each block multiplied by its group's weights:
            FLOPs of about (M + G * block) x K x N; XLA's fastest exact path on CPU.
  "native"  the C++ XLA:CPU kernel (`kernels.native_grouped_matmul`): each group's own rows times
            its weights read in place, no padding or weight copies; CPU only.
  "auto"    "pallas" on TPU/GPU; on CPU "native" where it builds, else "blocked".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import native_grouped_matmul
from kernels.backend import on_accelerator
from kernels.grouped_matmul_pallas import DEFAULT_TILES, pallas_grouped_matmul

IMPLS = ("auto", "xla", "pallas", "ragged", "blocked", "native")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_rows(x_MK, index_N, inverse_M, in_bounds: bool):
  """x[index] with zero rows where index is out of range, for a one-to-one `index`: `inverse`
  maps each row of x to where it went (out of range: nowhere). The gradient is then the inverse
  gather, not the scatter-add JAX would otherwise emit (serial on XLA:CPU). `in_bounds`: the
  caller promises both maps are permutations (no fill, no select on every row)."""
  return _gather(x_MK, index_N, in_bounds)


def _gather(x_MK, index_N, in_bounds):
  if in_bounds:
    return x_MK.at[index_N].get(mode="promise_in_bounds")
  return x_MK.at[index_N].get(mode="fill", fill_value=0)


def _gather_rows_fwd(x_MK, index_N, inverse_M, in_bounds):
  return _gather(x_MK, index_N, in_bounds), (index_N, inverse_M)


def _gather_rows_bwd(in_bounds, residuals, g_NK):
  index_N, inverse_M = residuals
  return _gather(g_NK, inverse_M, in_bounds), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class BlockLayout:
  """Rows sorted by group, each group padded to whole blocks of `block` rows.

  `to_blocks` places the rows in [num_blocks, block, K]; `from_blocks` takes them back (rows past
  sum(group sizes) belong to no group: zero, at no cost); `block_weights` picks each block's
  group's [K, N] weights by a one-hot matmul, whose gradient is a matmul too (a gather's would be
  a scatter-add). Both row moves are gathers in the forward and the backward.
  """

  def __init__(self, num_rows: int, group_sizes_G, block: int | None = None):
    m, g = num_rows, group_sizes_G.shape[0]
    if block is None:  # The power of two nearest M / G from above, at most 128.
      block = min(128, 1 << max(0, -(-m // g) - 1).bit_length())
    sizes = group_sizes_G.astype(jnp.int32)
    padded = (sizes + block - 1) // block * block
    ends, padded_ends = jnp.cumsum(sizes), jnp.cumsum(padded)
    group_of_row = jnp.searchsorted(ends, jnp.arange(m), side="right")
    dest = (padded_ends - padded)[group_of_row] + jnp.arange(m) - (ends - sizes)[group_of_row]
    self.block, self.num_blocks = block, -(-m // block) + g  # Static bound on padded rows / block.
    slots = self.num_blocks * block
    self.dest_M = jnp.where(group_of_row < g, dest, slots).astype(jnp.int32)  # Past the end: none.
    self.source_P = jnp.full((slots,), m, jnp.int32).at[self.dest_M].set(
        jnp.arange(m, dtype=jnp.int32), mode="drop")
    group_of_block = jnp.minimum(
        jnp.searchsorted(padded_ends, jnp.arange(self.num_blocks) * block, side="right"), g - 1)
    self.onehot_BG = jax.nn.one_hot(group_of_block, g)

  def to_blocks(self, x_MK):
    """[M, K] -> [num_blocks, block, K]; padding rows are zero."""
    return gather_rows(x_MK, self.source_P, self.dest_M, False).reshape(
        self.num_blocks, self.block, -1)

  def from_blocks(self, y_BIN):
    """[num_blocks, block, N] -> [M, N]."""
    return gather_rows(y_BIN.reshape(self.num_blocks * self.block, -1), self.dest_M,
                       self.source_P, False)

  def block_weights(self, rhs_GKN):
    """[G, K, N] -> each block's group's weights [num_blocks, K, N]."""
    return jnp.einsum("BG,GKN->BKN", self.onehot_BG.astype(rhs_GKN.dtype), rhs_GKN)


def blocked_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, block: int | None = None):
  """Each group's rows padded to a multiple of `block`; one [block, K] x [K, N] product per block
  (`BlockLayout`). The default block is the power of two nearest M / G from above, at most 128:
  few rows per group (decoding) then pad to a few rows, not to 128. Rows past sum(group sizes)
  belong to no group: their output is zero (as with ragged_dot).
  """
  layout = BlockLayout(lhs_MK.shape[0], group_sizes_G, block)
  out = jnp.einsum("BIK,BKN->BIN", layout.to_blocks(lhs_MK), layout.block_weights(rhs_GKN))
  return layout.from_blocks(out)


def blocked_swiglu(rows_MD, group_sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD,
                   block: int | None = None):
  """silu(x W_gate) * (x W_up) W_down per group, rows laid out in blocks once for all three
  products (three `blocked_grouped_matmul` calls would move the rows three times)."""
  layout = BlockLayout(rows_MD.shape[0], group_sizes_G, block)
  x_BID = layout.to_blocks(rows_MD)
  gate = jnp.einsum("BID,BDF->BIF", x_BID, layout.block_weights(w_gate_GDF))
  up = jnp.einsum("BID,BDF->BIF", x_BID, layout.block_weights(w_up_GDF))
  out = jnp.einsum("BIF,BFD->BID", jax.nn.silu(gate) * up, layout.block_weights(w_down_GFD))
  return layout.from_blocks(out)


def resolve_impl(impl: str, probe_native: bool = True) -> str:
  """The concrete grouped-matmul path `impl` names on this backend. `probe_native=False` takes
  the native CPU kernel as available instead of building it to find out (for planning)."""
  if impl not in IMPLS:
    raise ValueError(f"grouped_matmul impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    if on_accelerator():
      return "pallas"
    return "native" if not probe_native or native_grouped_matmul.available() else "blocked"
  if impl == "xla":
    return "ragged" if on_accelerator() else "blocked"
  return impl


def grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, impl: str = "auto", tiles=DEFAULT_TILES):
  """[M, K] rows (sorted by group, sizes summing to M) times their group's [K, N] weights.

  `tiles` (tm, tk, tn) are the Pallas kernel's; the XLA paths ignore them.
  """
  impl = resolve_impl(impl)
  if impl == "pallas":
    return pallas_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, tiles,
                                 interpret=not on_accelerator())
  if impl == "ragged":
    return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G)
  if impl == "native":
    return native_grouped_matmul.native_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G)
  return blocked_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G)
