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
            FLOPs of about (M + G * block) x K x N; the fast exact path on CPU.
  "auto"    "pallas" on TPU/GPU, "blocked" elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.backend import on_accelerator
from kernels.grouped_matmul_pallas import DEFAULT_TILES, pallas_grouped_matmul

IMPLS = ("auto", "xla", "pallas", "ragged", "blocked")


def blocked_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, block: int | None = None):
  """Each group's rows padded to a multiple of `block`; one [block, K] x [K, N] product per block.

  The default block is the power of two nearest M / G from above, at most 128: few rows per group
  (decoding) then pad to a few rows, not to 128. Rows past sum(group sizes) belong to no group:
  their output is zero (as with ragged_dot) and they cost nothing.
  """
  m, k = lhs_MK.shape
  g, _, n = rhs_GKN.shape
  if block is None:
    block = min(128, 1 << max(0, -(-m // g) - 1).bit_length())
  sizes = group_sizes_G.astype(jnp.int32)
  padded = (sizes + block - 1) // block * block
  ends, padded_ends = jnp.cumsum(sizes), jnp.cumsum(padded)
  group_of_row = jnp.searchsorted(ends, jnp.arange(m), side="right")
  dest = (padded_ends - padded)[group_of_row] + jnp.arange(m) - (ends - sizes)[group_of_row]
  num_blocks = -(-m // block) + g  # Static bound on the padded rows / block.
  dest = jnp.where(group_of_row < g, dest, num_blocks * block)  # Past the last group: dropped.
  buf = jnp.zeros((num_blocks * block, k), lhs_MK.dtype).at[dest].set(lhs_MK, mode="drop")
  group_of_block = jnp.minimum(
      jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block, side="right"), g - 1)
  out = jnp.einsum("BIK,BKN->BIN", buf.reshape(num_blocks, block, k), rhs_GKN[group_of_block])
  return out.reshape(num_blocks * block, n).at[dest].get(mode="fill", fill_value=0)


def grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, impl: str = "auto", tiles=DEFAULT_TILES):
  """[M, K] rows (sorted by group, sizes summing to M) times their group's [K, N] weights.

  `tiles` (tm, tk, tn) are the Pallas kernel's; the XLA paths ignore them.
  """
  if impl not in IMPLS:
    raise ValueError(f"grouped_matmul impl must be one of {IMPLS}, got {impl!r}")
  accelerator = on_accelerator()
  if impl == "auto":
    impl = "pallas" if accelerator else "blocked"
  if impl == "xla":
    impl = "ragged" if accelerator else "blocked"
  if impl == "pallas":
    return pallas_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, tiles,
                                 interpret=not accelerator)
  if impl == "ragged":
    return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G)
  return blocked_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G)
