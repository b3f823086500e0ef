"""Pallas grouped matmul (the MoE expert matmul) with a custom VJP, in two grid schedules.

  gmm:  lhs [M, K] sorted by group, rhs [G, K, N], group sizes [G] -> [M, N]
  tgmm: lhs [M, K], dout [M, N], group sizes [G] -> [G, K, N]   (the weight gradient)

"owned" (GPU, Triton): each program owns one output tile, so no two programs write the same
memory on a GPU's parallel grid. A gmm program owning rows [i*tm, (i+1)*tm) loops over the
groups those rows touch and, per group, over K tiles, keeping only that group's rows; a tgmm
program owning drhs[g, k-tile, n-tile] loops over the row tiles of group g. Operands are
whole-array refs read in `pl.ds` slices, which Triton loads from global memory.

"revisit" (TPU, Mosaic): the (row tile, group) pairs are listed before the call as work items
and scalar-prefetched; the grid walks them in order, BlockSpecs fetch exactly the tiles each
needs, and consecutive items on the same output tile (gmm) or the same group (tgmm) accumulate
into it while it stays resident (TPU's grid is sequential; the item axis is "arbitrary").

Either way a row tile straddling a group boundary is multiplied once per group it touches: about
(M + G*tm) x K x N of work. An empty group contributes nothing and gets a zero weight gradient.
Shapes are zero-padded to whole tiles in the wrapper, so K or N not a multiple of the tile is
exact (padded K columns multiply zeros; padded rows belong to no group and come out zero).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.backend import compiler_params, dot_f32, round_up

DEFAULT_TILES = (128, 128, 128)  # (tm, tk, tn).


def _gmm_owned_kernel(first_ref, last_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *,
                      tk):
  tm, tn = out_ref.shape
  i, j = pl.program_id(0), pl.program_id(1)
  row_M1 = i * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  rows, cols = pl.ds(i * tm, tm), pl.ds(j * tn, tn)

  def group_body(g, acc_MN):
    def k_body(kk, part_MN):
      depth = pl.ds(kk * tk, tk)
      return part_MN + dot_f32(lhs_ref[rows, depth], rhs_ref[g, depth, cols])

    part_MN = jax.lax.fori_loop(0, lhs_ref.shape[1] // tk, k_body, jnp.zeros((tm, tn), jnp.float32))
    in_group = (row_M1 >= starts_ref[g]) & (row_M1 < ends_ref[g])
    return acc_MN + jnp.where(in_group, part_MN, 0.0)

  acc_MN = jax.lax.fori_loop(first_ref[i], last_ref[i] + 1, group_body,
                             jnp.zeros((tm, tn), jnp.float32))
  out_ref[...] = acc_MN.astype(out_ref.dtype)


def _tgmm_owned_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, tm):
  tk, tn = out_ref.shape
  g, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[g], ends_ref[g]
  depth, cols = pl.ds(kk * tk, tk), pl.ds(j * tn, tn)

  def body(mt, acc_KN):
    rows = pl.ds(mt * tm, tm)
    row_M1 = mt * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    lhs_MK = jnp.where((row_M1 >= start) & (row_M1 < end), lhs_ref[rows, depth], 0)
    return acc_KN + dot_f32(lhs_MK.T, dout_ref[rows, cols])

  first = start // tm
  stop = jnp.where(end > start, (end + tm - 1) // tm, first)
  acc_KN = jax.lax.fori_loop(first, stop, body, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc_KN.astype(out_ref.dtype)


def _bounds(group_sizes_G):
  sizes = group_sizes_G.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  return ends - sizes, ends


def _tile_groups(ends_G, num_tiles: int, tm: int):
  """First and last group touching each row tile; (G, G-1) for tiles past the last row."""
  total = ends_G[-1]
  first_row = jnp.arange(num_tiles, dtype=jnp.int32) * tm
  last_row = jnp.minimum(first_row + tm, total) - 1
  first = jnp.searchsorted(ends_G, first_row, side="right").astype(jnp.int32)
  last = jnp.searchsorted(ends_G, last_row, side="right").astype(jnp.int32)
  past = first_row >= total
  g = ends_G.shape[0]
  return jnp.where(past, g, first), jnp.where(past, g - 1, last)


def _pad2(x, rows: int, cols: int):
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _gmm_owned(lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret):
  (m, k), (g, _, n) = lhs_MK.shape, rhs_GKN.shape
  tm, tk, tn = tiles
  mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
  starts, ends = _bounds(group_sizes_G)
  first, last = _tile_groups(ends, mp // tm, tm)
  lhs = _pad2(lhs_MK, mp, kp)
  rhs = jnp.pad(rhs_GKN, ((0, 0), (0, kp - k), (0, np_ - n)))
  out = pl.pallas_call(
      functools.partial(_gmm_owned_kernel, tk=tk),
      grid=(mp // tm, np_ // tn),
      in_specs=[_whole((mp // tm,)), _whole((mp // tm,)), _whole((g,)), _whole((g,)),
                _whole((mp, kp)), _whole((g, kp, np_))],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), lhs_MK.dtype),
      compiler_params=compiler_params(num_warps=4, num_stages=3),
      interpret=interpret, name="grouped_matmul",
  )(first, last, starts, ends, lhs, rhs)
  return out[:m, :n]


def _tgmm_owned(lhs_MK, dout_MN, group_sizes_G, tiles, out_dtype, interpret):
  (m, k), n, g = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
  tm, tk, tn = tiles
  mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
  starts, ends = _bounds(group_sizes_G)
  out = pl.pallas_call(
      functools.partial(_tgmm_owned_kernel, tm=tm),
      grid=(g, kp // tk, np_ // tn),
      in_specs=[_whole((g,)), _whole((g,)), _whole((mp, kp)), _whole((mp, np_))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda gi, kk, j: (gi, kk, j)),
      out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
      compiler_params=compiler_params(num_warps=4, num_stages=3),
      interpret=interpret, name="transposed_grouped_matmul",
  )(starts, ends, _pad2(lhs_MK, mp, kp), _pad2(dout_MN, mp, np_))
  return out[:, :k, :n]


def _work_items(group_sizes_G, num_tiles: int, tm: int):
  """Work items [W = num_tiles + G] in order: each row tile paired with each group it touches.

  Returns (tile, group, valid) int32 arrays; items past the real ones repeat the last real one
  (so no block changes) with valid = 0. Groups never decrease along the items.
  """
  g = group_sizes_G.shape[0]
  _, ends = _bounds(group_sizes_G)
  first, last = _tile_groups(ends, num_tiles, tm)
  counts = last - first + 1  # 0 for tiles past the last row.
  offsets = jnp.cumsum(counts)
  w = jnp.arange(num_tiles + g, dtype=jnp.int32)
  valid = w < offsets[-1]
  w = jnp.where(valid, w, jnp.maximum(offsets[-1] - 1, 0))
  tile = jnp.minimum(jnp.searchsorted(offsets, w, side="right"), num_tiles - 1).astype(jnp.int32)
  group = jnp.clip(first[tile] + w - (offsets[tile] - counts[tile]), 0, g - 1).astype(jnp.int32)
  return tile, group, valid.astype(jnp.int32)


def _gmm_revisit_kernel(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, lhs_ref, rhs_ref,
                        out_ref, acc_ref):
  tm = out_ref.shape[0]
  w, kk = pl.program_id(1), pl.program_id(2)
  valid = valid_ref[w] == 1

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(valid)
  def _():
    acc_ref[...] += dot_f32(lhs_ref[...], rhs_ref[...])

  @pl.when(valid & (kk == pl.num_programs(2) - 1))
  def _():
    g, tile = group_ref[w], tile_ref[w]
    row_M1 = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    in_group = (row_M1 >= starts_ref[g]) & (row_M1 < ends_ref[g])
    fresh = (w == 0) | (tile_ref[jnp.maximum(w - 1, 0)] != tile)  # First visit: no old rows.
    old_MN = jnp.where(fresh, 0.0, out_ref[...].astype(jnp.float32))
    out_ref[...] = jnp.where(in_group, acc_ref[...], old_MN).astype(out_ref.dtype)


def _tgmm_revisit_kernel(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, lhs_ref, dout_ref,
                         out_ref, acc_ref):
  tm = lhs_ref.shape[0]
  w, last = pl.program_id(2), pl.num_programs(2) - 1
  g, tile = group_ref[w], tile_ref[w]

  @pl.when((w == 0) | (group_ref[jnp.maximum(w - 1, 0)] != g))
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(valid_ref[w] == 1)
  def _():
    row_M1 = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    in_group = (row_M1 >= starts_ref[g]) & (row_M1 < ends_ref[g])
    lhs_MK = jnp.where(in_group, lhs_ref[...], 0)
    acc_ref[...] += dot_f32(lhs_MK.T, dout_ref[...])

  @pl.when((w == last) | (group_ref[jnp.minimum(w + 1, last)] != g))
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _revisit_call(kernel, grid, in_specs, out_spec, out_shape, scratch, semantics, name,
                  interpret):
  from jax.experimental.pallas import tpu as pltpu  # Deferred: the TPU grid spec.
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=grid, in_specs=in_specs, out_specs=out_spec,
          scratch_shapes=[pltpu.VMEM(scratch, jnp.float32)]),
      out_shape=out_shape,
      compiler_params=compiler_params(dimension_semantics=semantics),
      interpret=interpret, name=name)


def _gmm_revisit(lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret):
  (m, k), (g, _, n) = lhs_MK.shape, rhs_GKN.shape
  tm, tk, tn = tiles
  mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
  starts, ends = _bounds(group_sizes_G)
  items = _work_items(group_sizes_G, mp // tm, tm)
  call = _revisit_call(
      _gmm_revisit_kernel, (np_ // tn, mp // tm + g, kp // tk),
      [pl.BlockSpec((tm, tk), lambda j, w, kk, tile, *_: (tile[w], kk)),
       pl.BlockSpec((None, tk, tn), lambda j, w, kk, tile, group, *_: (group[w], kk, j))],
      pl.BlockSpec((tm, tn), lambda j, w, kk, tile, *_: (tile[w], j)),
      jax.ShapeDtypeStruct((mp, np_), lhs_MK.dtype), (tm, tn),
      ("parallel", "arbitrary", "arbitrary"), "grouped_matmul", interpret)
  out = call(*items, starts, ends, _pad2(lhs_MK, mp, kp),
             jnp.pad(rhs_GKN, ((0, 0), (0, kp - k), (0, np_ - n))))
  rows_M1 = jnp.arange(m)[:, None]
  return jnp.where(rows_M1 < ends[-1], out[:m, :n], 0)  # Row tiles past the last group: unvisited.


def _tgmm_revisit(lhs_MK, dout_MN, group_sizes_G, tiles, out_dtype, interpret):
  (m, k), n, g = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
  tm, tk, tn = tiles
  mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
  starts, ends = _bounds(group_sizes_G)
  items = _work_items(group_sizes_G, mp // tm, tm)
  call = _revisit_call(
      _tgmm_revisit_kernel, (kp // tk, np_ // tn, mp // tm + g),
      [pl.BlockSpec((tm, tk), lambda kk, j, w, tile, *_: (tile[w], kk)),
       pl.BlockSpec((tm, tn), lambda kk, j, w, tile, *_: (tile[w], j))],
      pl.BlockSpec((None, tk, tn), lambda kk, j, w, tile, group, *_: (group[w], kk, j)),
      jax.ShapeDtypeStruct((g, kp, np_), out_dtype), (tk, tn),
      ("parallel", "parallel", "arbitrary"), "transposed_grouped_matmul", interpret)
  out = call(*items, starts, ends, _pad2(lhs_MK, mp, kp), _pad2(dout_MN, mp, np_))
  empty = (group_sizes_G == 0)[:, None, None]  # Groups with no rows may never be visited.
  return jnp.where(empty, 0, out[:, :k, :n]).astype(out_dtype)


SCHEDULES = {"owned": (_gmm_owned, _tgmm_owned), "revisit": (_gmm_revisit, _tgmm_revisit)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_vjp(lhs_MK, rhs_GKN, group_sizes_G, tiles, schedule, interpret):
  return SCHEDULES[schedule][0](lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret)


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, tiles, schedule, interpret):
  out = SCHEDULES[schedule][0](lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret)
  return out, (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_bwd(tiles, schedule, interpret, residuals, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = residuals
  gmm, tgmm = SCHEDULES[schedule]
  tm, tk, tn = tiles
  dout_MN = dout_MN.astype(lhs_MK.dtype)
  dlhs = gmm(dout_MN, jnp.swapaxes(rhs_GKN, 1, 2), group_sizes_G, (tm, tn, tk), interpret)
  drhs = tgmm(lhs_MK, dout_MN, group_sizes_G, tiles, rhs_GKN.dtype, interpret)
  return dlhs, drhs, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def _clip_tile(tile: int, size: int, floor: int) -> int:
  return min(tile, max(floor, 1 << (max(size, 1) - 1).bit_length()))


def pallas_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, tiles=DEFAULT_TILES,
                          schedule: Optional[str] = None, interpret: bool = False):
  """The Pallas grouped matmul, differentiable in lhs and rhs.

  Tiles (tm, tk, tn) are powers of two >= 16, clipped to the problem: tm to the mean group size
  (rounded up to a power of two; a row tile straddling g groups is multiplied g times), tk and
  tn to K and N (on TPU not below 128, the lane width).
  `schedule`: "owned" (each program owns an output tile; GPU) or "revisit" (consecutive steps
  of TPU's sequential grid accumulate into a resident tile); None picks by backend.
  """
  if len(tiles) != 3 or any(t < 16 or t & (t - 1) for t in tiles):
    raise ValueError(f"grouped matmul tiles must be three powers of two >= 16, got {tiles}")
  tpu = jax.default_backend() == "tpu"
  if schedule is None:
    schedule = "revisit" if tpu else "owned"
  if schedule not in SCHEDULES:
    raise ValueError(
        f"grouped matmul schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
  (m, k), (g, _, n) = lhs_MK.shape, rhs_GKN.shape
  lanes = 128 if tpu else 16
  tiles = (_clip_tile(tiles[0], -(-m // g), 16), _clip_tile(tiles[1], k, lanes),
           _clip_tile(tiles[2], n, lanes))
  return _gmm_vjp(lhs_MK, rhs_GKN, group_sizes_G, tiles, schedule, bool(interpret))
