"""Pallas grouped matmul (the MoE expert matmul) with a custom VJP.

  gmm:  lhs [M, K] sorted by group, rhs [G, K, N], group sizes [G] -> [M, N]
  tgmm: lhs [M, K], dout [M, N], group sizes [G] -> [G, K, N]   (the weight gradient)

Each program owns one output tile, so no two programs write the same memory (safe on a GPU's
parallel grid) and nothing is accumulated across grid steps. A gmm program owning rows
[i*tm, (i+1)*tm) loops over the groups those rows touch (found from the cumulative sizes before
the call) and, per group, over K tiles, keeping only the rows of that group; a tile straddling a
boundary is multiplied once per group it touches, so the work is about (M + G*tm) x K x N. A
tgmm program owning drhs[g, k-tile, n-tile] loops over the row tiles of group g. An empty group
contributes nothing and gets a zero weight gradient.

Shapes are zero-padded in the wrapper to whole tiles, so K or N not a multiple of the tile is
exact (the padded K columns multiply zeros; padded rows belong to no group and come out zero).
Tiles are powers of two of at least 16 (Triton's dot shapes). The whole-array refs with `pl.ds`
slices suit Triton, which loads each slice from global memory; on TPU the same body would hold
whole operands in VMEM and needs a scalar-prefetch grid instead (not written: untested there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.backend import compiler_params

DEFAULT_TILES = (128, 128, 128)  # (tm, tk, tn).


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _gmm_kernel(first_ref, last_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, tk):
  tm, tn = out_ref.shape
  i, j = pl.program_id(0), pl.program_id(1)
  row_M1 = i * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  rows, cols = pl.ds(i * tm, tm), pl.ds(j * tn, tn)

  def group_body(g, acc_MN):
    def k_body(kk, part_MN):
      depth = pl.ds(kk * tk, tk)
      return part_MN + _dot(lhs_ref[rows, depth], rhs_ref[g, depth, cols])

    part_MN = jax.lax.fori_loop(0, lhs_ref.shape[1] // tk, k_body, jnp.zeros((tm, tn), jnp.float32))
    in_group = (row_M1 >= starts_ref[g]) & (row_M1 < ends_ref[g])
    return acc_MN + jnp.where(in_group, part_MN, 0.0)

  acc_MN = jax.lax.fori_loop(first_ref[i], last_ref[i] + 1, group_body,
                             jnp.zeros((tm, tn), jnp.float32))
  out_ref[...] = acc_MN.astype(out_ref.dtype)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, tm):
  tk, tn = out_ref.shape
  g, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[g], ends_ref[g]
  depth, cols = pl.ds(kk * tk, tk), pl.ds(j * tn, tn)

  def body(mt, acc_KN):
    rows = pl.ds(mt * tm, tm)
    row_M1 = mt * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    lhs_MK = jnp.where((row_M1 >= start) & (row_M1 < end), lhs_ref[rows, depth], 0)
    return acc_KN + _dot(lhs_MK.T, dout_ref[rows, cols])

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


def _gmm(lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret):
  (m, k), (g, _, n) = lhs_MK.shape, rhs_GKN.shape
  tm, tk, tn = tiles
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  starts, ends = _bounds(group_sizes_G)
  first, last = _tile_groups(ends, mp // tm, tm)
  lhs = _pad2(lhs_MK, mp, kp)
  rhs = jnp.pad(rhs_GKN, ((0, 0), (0, kp - k), (0, np_ - n)))
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, tk=tk),
      grid=(mp // tm, np_ // tn),
      in_specs=[_whole((mp // tm,)), _whole((mp // tm,)), _whole((g,)), _whole((g,)),
                _whole((mp, kp)), _whole((g, kp, np_))],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), lhs_MK.dtype),
      compiler_params=compiler_params(num_warps=4, num_stages=3),
      interpret=interpret, name="grouped_matmul",
  )(first, last, starts, ends, lhs, rhs)
  return out[:m, :n]


def _tgmm(lhs_MK, dout_MN, group_sizes_G, tiles, out_dtype, interpret):
  (m, k), n, g = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
  tm, tk, tn = tiles
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  starts, ends = _bounds(group_sizes_G)
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      grid=(g, kp // tk, np_ // tn),
      in_specs=[_whole((g,)), _whole((g,)), _whole((mp, kp)), _whole((mp, np_))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda gi, kk, j: (gi, kk, j)),
      out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
      compiler_params=compiler_params(num_warps=4, num_stages=3),
      interpret=interpret, name="transposed_grouped_matmul",
  )(starts, ends, _pad2(lhs_MK, mp, kp), _pad2(dout_MN, mp, np_))
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_vjp(lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret):
  return _gmm(lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret)


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret):
  return _gmm(lhs_MK, rhs_GKN, group_sizes_G, tiles, interpret), (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_bwd(tiles, interpret, residuals, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = residuals
  tm, tk, tn = tiles
  dout_MN = dout_MN.astype(lhs_MK.dtype)
  dlhs = _gmm(dout_MN, jnp.swapaxes(rhs_GKN, 1, 2), group_sizes_G, (tm, tn, tk), interpret)
  drhs = _tgmm(lhs_MK, dout_MN, group_sizes_G, tiles, rhs_GKN.dtype, interpret)
  return dlhs, drhs, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def _clip_tile(tile: int, size: int) -> int:
  return min(tile, max(16, 1 << (max(size, 1) - 1).bit_length()))


def pallas_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, tiles=DEFAULT_TILES,
                          interpret: bool = False):
  """The Pallas grouped matmul, differentiable in lhs and rhs; tiles (tm, tk, tn) are powers of
  two >= 16, clipped to the (padded) problem size."""
  if len(tiles) != 3 or any(t < 16 or t & (t - 1) for t in tiles):
    raise ValueError(f"grouped matmul tiles must be three powers of two >= 16, got {tiles}")
  (m, k), (_, _, n) = lhs_MK.shape, rhs_GKN.shape
  tiles = (_clip_tile(tiles[0], m), _clip_tile(tiles[1], k), _clip_tile(tiles[2], n))
  return _gmm_vjp(lhs_MK, rhs_GKN, group_sizes_G, tiles, bool(interpret))
