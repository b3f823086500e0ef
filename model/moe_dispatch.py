"""Routing a token's expert assignments to where they are computed and back: the one dispatch
every MoE path uses (single-device dropless and capacity, expert-parallel all_to_all and ragged).

The T x K assignments are flattened and sorted (stably) by group: the expert itself on one device,
the device holding the expert under expert parallelism. `Dispatch` records that order, each sorted
row's expert, group and rank within its group, and the group sizes; the paths differ only in
where they put the sorted rows (a grouped matmul's contiguous groups, fixed [group, slot]
buffers, ragged exchanges) and all come back through `combine`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.grouped_matmul import blocked_swiglu, gather_rows, grouped_matmul, resolve_impl


class Dispatch(NamedTuple):
  """The flattened assignments [T*K] sorted by group; every field is in sorted order."""

  order: jax.Array  # [T*K] int: index of each sorted row among the flattened assignments.
  position: jax.Array  # [T*K] int: the inverse: each flattened assignment's sorted row.
  expert: jax.Array  # [T*K] int: its expert.
  group: jax.Array  # [T*K] int: its group (expert // experts_per_group).
  rank: jax.Array  # [T*K] int: its position within its group.
  sizes: jax.Array  # [G] int32: rows per group.
  k: int  # Assignments per token.

  @property
  def token(self) -> jax.Array:
    """[T*K] the token each sorted row belongs to."""
    return self.order // self.k

  def rows(self, x_TD: jax.Array) -> jax.Array:
    """[T*K, D] each sorted row's token's features (x_TD[token]): the tokens repeated K times,
    then permuted by `gather_rows`, so the gradient is gathers and a sum over K, not a
    scatter-add."""
    return gather_rows(jnp.repeat(x_TD, self.k, axis=0), self.order, self.position, True)

  def slots(self, capacity: int) -> tuple[jax.Array, jax.Array]:
    """(slot [T*K], kept [T*K]) in a [group, capacity] buffer: the first `capacity` rows of each
    group keep their rank; later ones get slot `capacity`, out of bounds (a dropping scatter
    skips them, a filling gather reads 0)."""
    kept = self.rank < capacity
    return jnp.where(kept, self.rank, capacity), kept


def sort_assignments(experts_TK: jax.Array, num_groups: int, experts_per_group: int = 1
                     ) -> Dispatch:
  """Sorts the assignments [T, K] by group = expert // experts_per_group (stable: within a group,
  by expert, then token, then slot). Experts outside [0, num_groups * experts_per_group) belong
  to no group: they sort last and are not counted in `sizes`."""
  k = experts_TK.shape[1]
  flat = experts_TK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  expert = flat[order]
  group = expert // experts_per_group
  sizes = jnp.zeros((num_groups,), jnp.int32).at[group].add(1, mode="drop")
  rank = jnp.arange(flat.shape[0]) - (jnp.cumsum(sizes) - sizes)[jnp.clip(group, 0, num_groups - 1)]
  position = jnp.zeros_like(order).at[order].set(jnp.arange(flat.shape[0], dtype=order.dtype))
  return Dispatch(order, position, expert, group, rank, sizes, k)


def unsort(rows_sorted: jax.Array, d: Dispatch) -> jax.Array:
  """Rows in sorted order [T*K, ...] back in assignment order, as [T, K, ...]."""
  rows = gather_rows(rows_sorted, d.position, d.order, True)
  return rows.reshape((-1, d.k) + rows_sorted.shape[1:])


def combine(y_sorted_D: jax.Array, d: Dispatch, weights_TK: jax.Array, dtype) -> jax.Array:
  """Each token's expert outputs (sorted rows [T*K, D]) summed with its gate weights, in float32;
  returns [T, D] in `dtype`."""
  y_TKD = unsort(y_sorted_D, d).astype(jnp.float32)
  return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK).astype(dtype)


def grouped_swiglu(rows_MD, sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD, impl: str = "auto"):
  """SwiGLU of rows sorted by group, each with its group's weights (kernels.grouped_matmul);
  rows past sum(sizes) get 0."""
  if resolve_impl(impl) == "blocked":
    return blocked_swiglu(rows_MD, sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD)
  h = (jax.nn.silu(grouped_matmul(rows_MD, w_gate_GDF, sizes_G, impl))
       * grouped_matmul(rows_MD, w_up_GDF, sizes_G, impl))
  return grouped_matmul(h, w_down_GFD, sizes_G, impl)
