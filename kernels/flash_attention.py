"""Flash attention for MLA shapes (qk head size H != value head size V), forward and backward.

`flash_attention` is a Pallas kernel with a `jax.custom_vjp` whose backward is two more Pallas
kernels (one per block of keys for dK/dV, one per block of queries for dQ), each recomputing the
probabilities from the saved log-sum-exp. `reference_attention` is the pure-JAX definition all
must match.

Numerics: logits and softmax statistics in float32, online softmax (running max and sum) over key
blocks, explicit `scale`, causal and segment masks applied inside each block. A query whose every
key is masked gets a zero output (and zero gradients), never NaN.

Layout and padding, done in the wrapper: heads move in front of time ([B, N, T, H]) so each block
is a 2-D [time, head] tile; time is padded to a multiple of the block sizes, head sizes to a
power of two of at least 16 (Triton's block shapes; on TPU to a multiple of 128, Mosaic's lane
tile). Padded keys are masked by position, padded head columns are zeros, padded query rows
are sliced off.

Two schedules share the per-block math: "loop" (GPU, Triton) gives each program one block and a
`fori_loop` over the other sequence, read in `pl.ds` slices of whole-sequence refs (Triton loads
them from global memory); "grid" (TPU, Mosaic) makes the other sequence the innermost grid axis
with accumulators in VMEM scratch, so only one block of each operand is resident, and causally
empty steps are skipped without fetching a new block.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.backend import compiler_params, dot_f32, round_up

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # Finite: exp(MASK - MASK) stays defined.
SCHEDULES = ("loop", "grid")


def reference_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale: float, causal: bool = True):
  """softmax(q k^T * scale) v in float32, causal (top-left aligned) and within segments.

  Segment ids [B, max(T, S)]: queries use the first T, keys the first S (None: one segment).
  """
  t, s = q_BTNH.shape[1], k_BSNH.shape[1]
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((q_BTNH.shape[0], max(t, s)), jnp.int32)
  mask_BTS = visible_keys(segment_ids_BT[:, :t], segment_ids_BT[:, :s], 0, causal)
  return masked_attention(q_BTNH, k_BSNH, v_BSNV, mask_BTS, scale)


def visible_keys(q_segments_BT, k_segments_BS, q_start: int, causal: bool):
  """[B, T, S] True where query `q_start + t` may attend key s: same segment and, when causal,
  s <= q_start + t."""
  mask_BTS = q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
  if causal:
    t, s = q_segments_BT.shape[1], k_segments_BS.shape[1]
    mask_BTS = mask_BTS & (jnp.arange(q_start, q_start + t)[:, None] >= jnp.arange(s)[None])[None]
  return mask_BTS


def masked_attention(q_BTNH, k_BSNH, v_BSNV, mask_BTS, scale: float):
  """softmax(q k^T * scale) v over the keys `mask` [B, T, S] lets each query see, in float32; a
  query that sees no key gets zeros."""
  logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH,
                           preferred_element_type=jnp.float32) * scale
  logits_BNTS = jnp.where(mask_BTS[:, None], logits_BNTS, MASK_VALUE)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1) * mask_BTS[:, None]  # Empty rows -> 0.
  out_BTNV = jnp.einsum("BNTS,BSNV->BTNV", probs_BNTS.astype(v_BSNV.dtype), v_BSNV,
                        preferred_element_type=jnp.float32)
  return out_BTNV.astype(v_BSNV.dtype)


def _padded_head(size: int) -> int:
  """Triton wants power-of-two block dims (>= 16 for its dots); Mosaic wants 128 lanes."""
  if jax.default_backend() == "tpu":
    return round_up(size, 128)
  return max(16, 1 << (size - 1).bit_length())


def _block_mask(q_seg_Q1, kv_seg_1K, q_start, kv_start, kv_len: int, causal: bool):
  """[block_q, block_k] True where the query may attend the key."""
  shape = (q_seg_Q1.shape[0], kv_seg_1K.shape[1])
  kv_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  mask = (q_seg_Q1 == kv_seg_1K) & (kv_pos < kv_len)
  if causal:
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    mask = mask & (q_pos >= kv_pos)
  return mask


def _kv_blocks(q_block, block_q: int, block_k: int, num_k: int, causal: bool):
  """Number of key blocks query block `q_block` needs (all of them unless causal)."""
  if not causal:
    return num_k
  return jnp.minimum(num_k, ((q_block + 1) * block_q + block_k - 1) // block_k)


# The math of one (query block, key block) pair, shared by both schedules.

def _forward_update(q_QH, k_KH, v_KV, mask_QK, scale, carry):
  """Online softmax: folds one key block into (acc [Q, V], running max [Q, 1], running sum)."""
  acc_QV, m_Q1, l_Q1 = carry
  s_QK = jnp.where(mask_QK, dot_f32(q_QH, k_KH.T) * scale, MASK_VALUE)
  m_new = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
  p_QK = jnp.where(mask_QK, jnp.exp(s_QK - m_new), 0.0)
  alpha = jnp.exp(m_Q1 - m_new)
  return (alpha * acc_QV + dot_f32(p_QK.astype(v_KV.dtype), v_KV), m_new,
          alpha * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True))


def _forward_finish(acc_QV, m_Q1, l_Q1):
  """(output, log-sum-exp); rows with no visible key get output 0, not 0/0."""
  l_safe = jnp.where(l_Q1 == 0.0, 1.0, l_Q1)
  return acc_QV / l_safe, m_Q1 + jnp.log(l_safe)


def _backward_scores(q_QH, k_KH, v_KV, do_QV, lse_Q1, delta_Q1, mask_QK, scale):
  """Recomputed probabilities p [Q, K] and the logits' gradient ds = p (dp - delta) * scale."""
  p_QK = jnp.where(mask_QK, jnp.exp(dot_f32(q_QH, k_KH.T) * scale - lse_Q1), 0.0)
  return p_QK, p_QK * (dot_f32(do_QV, v_KV.T) - delta_Q1) * scale


# "loop" schedule (GPU/Triton): a program per output block loops over the other sequence, read
# in `pl.ds` slices of whole-sequence refs.

def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *,
                    scale, causal, block_k, kv_len):
  block_q = q_ref.shape[0]
  q_block = pl.program_id(2)
  q_QH, q_seg_Q1 = q_ref[...], q_seg_ref[...]

  def body(j, carry):
    keys = pl.ds(j * block_k, block_k)
    mask = _block_mask(q_seg_Q1, kv_seg_ref[:, keys], q_block * block_q, j * block_k, kv_len,
                       causal)
    return _forward_update(q_QH, k_ref[keys, :], v_ref[keys, :], mask, scale, carry)

  carry = (jnp.zeros((block_q, v_ref.shape[1]), jnp.float32),
           jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
           jnp.zeros((block_q, 1), jnp.float32))
  num_k = _kv_blocks(q_block, block_q, block_k, k_ref.shape[0] // block_k, causal)
  o_QV, lse_Q1 = _forward_finish(*jax.lax.fori_loop(0, num_k, body, carry))
  o_ref[...] = o_QV.astype(o_ref.dtype)
  lse_ref[...] = lse_Q1


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale, causal, block_q, kv_len):
  block_k = k_ref.shape[0]
  kv_block = pl.program_id(2)
  k_KH, v_KV, kv_seg_1K = k_ref[...], v_ref[...], kv_seg_ref[...]

  def body(i, carry):
    dk_KH, dv_KV = carry
    rows = pl.ds(i * block_q, block_q)
    q_QH, do_QV = q_ref[rows, :], do_ref[rows, :]
    mask = _block_mask(q_seg_ref[rows, :], kv_seg_1K, i * block_q, kv_block * block_k, kv_len,
                       causal)
    p_QK, ds_QK = _backward_scores(q_QH, k_KH, v_KV, do_QV, lse_ref[rows, :],
                                   delta_ref[rows, :], mask, scale)
    return (dk_KH + dot_f32(ds_QK.astype(q_QH.dtype).T, q_QH),
            dv_KV + dot_f32(p_QK.astype(do_QV.dtype).T, do_QV))

  first = (kv_block * block_k) // block_q if causal else 0
  carry = (jnp.zeros(k_KH.shape, jnp.float32), jnp.zeros(v_KV.shape, jnp.float32))
  dk_KH, dv_KV = jax.lax.fori_loop(first, q_ref.shape[0] // block_q, body, carry)
  dk_ref[...] = dk_KH.astype(dk_ref.dtype)
  dv_ref[...] = dv_KV.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, causal, block_k, kv_len):
  block_q = q_ref.shape[0]
  q_block = pl.program_id(2)
  q_QH, do_QV, q_seg_Q1 = q_ref[...], do_ref[...], q_seg_ref[...]

  def body(j, dq_QH):
    keys = pl.ds(j * block_k, block_k)
    k_KH = k_ref[keys, :]
    mask = _block_mask(q_seg_Q1, kv_seg_ref[:, keys], q_block * block_q, j * block_k, kv_len,
                       causal)
    _, ds_QK = _backward_scores(q_QH, k_KH, v_ref[keys, :], do_QV, lse_ref[...], delta_ref[...],
                                mask, scale)
    return dq_QH + dot_f32(ds_QK.astype(k_KH.dtype), k_KH)

  num_k = _kv_blocks(q_block, block_q, block_k, k_ref.shape[0] // block_k, causal)
  dq_QH = jax.lax.fori_loop(0, num_k, body, jnp.zeros(q_QH.shape, jnp.float32))
  dq_ref[...] = dq_QH.astype(dq_ref.dtype)


# "grid" schedule (TPU/Mosaic): the other sequence is the innermost ("arbitrary") grid axis, so
# only one block of each operand sits in VMEM; accumulators live in scratch across its steps.

def _needed(q_block, kv_block, block_q: int, block_k: int, causal: bool):
  """Whether the (query block, key block) pair has any unmasked causal entry."""
  return kv_block * block_k <= q_block * block_q + block_q - 1 if causal else kv_block >= 0


def _forward_grid_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, acc_ref,
                         m_ref, l_ref, *, scale, causal, kv_len):
  (block_q, block_k), (i, j) = (q_ref.shape[0], k_ref.shape[0]), (pl.program_id(2),
                                                                   pl.program_id(3))

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when(_needed(i, j, block_q, block_k, causal))
  def _():
    mask = _block_mask(q_seg_ref[...], kv_seg_ref[...], i * block_q, j * block_k, kv_len, causal)
    carry = _forward_update(q_ref[...], k_ref[...], v_ref[...], mask, scale,
                            (acc_ref[...], m_ref[...], l_ref[...]))
    acc_ref[...], m_ref[...], l_ref[...] = carry

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    o_QV, lse_Q1 = _forward_finish(acc_ref[...], m_ref[...], l_ref[...])
    o_ref[...] = o_QV.astype(o_ref.dtype)
    lse_ref[...] = lse_Q1


def _dkv_grid_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                     dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, scale, causal, kv_len):
  (block_q, block_k), (j, i) = (q_ref.shape[0], k_ref.shape[0]), (pl.program_id(2),
                                                                   pl.program_id(3))

  @pl.when(i == 0)
  def _():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  @pl.when(_needed(i, j, block_q, block_k, causal))
  def _():
    q_QH, do_QV = q_ref[...], do_ref[...]
    mask = _block_mask(q_seg_ref[...], kv_seg_ref[...], i * block_q, j * block_k, kv_len, causal)
    p_QK, ds_QK = _backward_scores(q_QH, k_ref[...], v_ref[...], do_QV, lse_ref[...],
                                   delta_ref[...], mask, scale)
    dk_acc_ref[...] += dot_f32(ds_QK.astype(q_QH.dtype).T, q_QH)
    dv_acc_ref[...] += dot_f32(p_QK.astype(do_QV.dtype).T, do_QV)

  @pl.when(i == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _dq_grid_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                    dq_ref, dq_acc_ref, *, scale, causal, kv_len):
  (block_q, block_k), (i, j) = (q_ref.shape[0], k_ref.shape[0]), (pl.program_id(2),
                                                                   pl.program_id(3))

  @pl.when(j == 0)
  def _():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  @pl.when(_needed(i, j, block_q, block_k, causal))
  def _():
    k_KH = k_ref[...]
    mask = _block_mask(q_seg_ref[...], kv_seg_ref[...], i * block_q, j * block_k, kv_len, causal)
    _, ds_QK = _backward_scores(q_ref[...], k_KH, v_ref[...], do_ref[...], lse_ref[...],
                                delta_ref[...], mask, scale)
    dq_acc_ref[...] += dot_f32(ds_QK.astype(k_KH.dtype), k_KH)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


class _Padded:
  """Kernel layout: [B, N, T_pad, H_pad] etc.; segment ids [B, T_pad, 1] and [B, 1, S_pad]."""

  def __init__(self, q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, block_q, block_k):
    t, s, h, v = q_BTNH.shape[1], k_BSNH.shape[1], q_BTNH.shape[-1], v_BSNV.shape[-1]
    self.t, self.s, self.h, self.v_size = t, s, h, v
    self.t_pad, self.s_pad = round_up(t, block_q), round_up(s, block_k)
    self.h_pad, self.v_pad = _padded_head(h), _padded_head(v)
    self.q = self.to_kernel(q_BTNH, self.t_pad, self.h_pad)
    self.k = self.to_kernel(k_BSNH, self.s_pad, self.h_pad)
    self.v = self.to_kernel(v_BSNV, self.s_pad, self.v_pad)
    seg = segment_ids_BT.astype(jnp.int32)
    self.q_seg = jnp.pad(seg[:, :t], ((0, 0), (0, self.t_pad - t)))[:, :, None]
    self.kv_seg = jnp.pad(seg[:, :s], ((0, 0), (0, self.s_pad - s)))[:, None, :]

  @staticmethod
  def to_kernel(x_BTNH, t_pad, h_pad):
    x_BNTH = jnp.swapaxes(x_BTNH, 1, 2)
    t, h = x_BNTH.shape[2:]
    return jnp.pad(x_BNTH, ((0, 0), (0, 0), (0, t_pad - t), (0, h_pad - h)))

  @staticmethod
  def from_kernel(x_BNTH, t, h):
    return jnp.swapaxes(x_BNTH[:, :, :t, :h], 1, 2)


class _Specs:
  """BlockSpecs for a schedule. "loop": grid (B, N, X), X the block of the tiled side, the other
  side whole. "grid": grid (B, N, X, Y), both sides tiled; `q_block(x, y)` and `kv_block(x, y)`
  name the blocks a step reads (causally empty steps repeat a block, so nothing new is copied)."""

  def __init__(self, block_q, block_k, t_pad, s_pad, q_block=None, kv_block=None):
    self.block_q, self.block_k, self.t_pad, self.s_pad = block_q, block_k, t_pad, s_pad
    self.q_block, self.kv_block = q_block, kv_block

  def _time(self, block_of, whole):
    if block_of is None:  # Loop schedule: grid (b, n, x).
      return lambda x: 0 if whole else x
    return block_of

  def q(self, width, whole=False):
    at = self._time(self.q_block, whole)
    rows = self.t_pad if whole else self.block_q
    return pl.BlockSpec((None, None, rows, width), lambda b, n, *xy: (b, n, at(*xy), 0))

  def kv(self, width, whole=False):
    at = self._time(self.kv_block, whole)
    rows = self.s_pad if whole else self.block_k
    return pl.BlockSpec((None, None, rows, width), lambda b, n, *xy: (b, n, at(*xy), 0))

  def q_seg(self, whole=False):
    at = self._time(self.q_block, whole)
    rows = self.t_pad if whole else self.block_q
    return pl.BlockSpec((None, rows, 1), lambda b, n, *xy: (b, at(*xy), 0))

  def kv_seg(self, whole=False):
    at = self._time(self.kv_block, whole)
    cols = self.s_pad if whole else self.block_k
    return pl.BlockSpec((None, 1, cols), lambda b, n, *xy: (b, 0, at(*xy)))


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, name, interpret, num_warps):
  """pallas_call with the backend's compiler parameters; scratch (grid schedule) in VMEM."""
  scratch_shapes = ()
  if scratch:
    from jax.experimental.pallas import tpu as pltpu  # Deferred: TPU memory spaces.
    scratch_shapes = [pltpu.VMEM(shape, jnp.float32) for shape in scratch]
  semantics = ("parallel",) * (len(grid) - 1) + ("arbitrary",) if scratch else None
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=scratch_shapes, interpret=interpret, name=name,
      compiler_params=compiler_params(num_warps=num_warps, dimension_semantics=semantics))


def _forward(p: _Padded, scale, causal, block_q, block_k, schedule, interpret):
  b, n = p.q.shape[:2]
  nq, nk = p.t_pad // block_q, p.s_pad // block_k
  common = dict(scale=scale, causal=causal, kv_len=p.s)
  if schedule == "loop":
    sp, whole = _Specs(block_q, block_k, p.t_pad, p.s_pad), True
    kernel = functools.partial(_forward_kernel, block_k=block_k, **common)
    grid, scratch = (b, n, nq), []
  else:
    last_kv = lambda x, y: jnp.minimum(y, ((x + 1) * block_q - 1) // block_k) if causal else y
    sp, whole = _Specs(block_q, block_k, p.t_pad, p.s_pad, lambda x, y: x, last_kv), False
    kernel = functools.partial(_forward_grid_kernel, **common)
    grid, scratch = (b, n, nq, nk), [(block_q, p.v_pad), (block_q, 1), (block_q, 1)]
  in_specs = [sp.q(p.h_pad), sp.kv(p.h_pad, whole), sp.kv(p.v_pad, whole), sp.q_seg(),
              sp.kv_seg(whole)]
  out_shape = [jax.ShapeDtypeStruct((b, n, p.t_pad, p.v_pad), p.v.dtype),
               jax.ShapeDtypeStruct((b, n, p.t_pad, 1), jnp.float32)]
  call = _call(kernel, grid, in_specs, [sp.q(p.v_pad), sp.q(1)], out_shape, scratch,
               "flash_attention_forward", interpret, num_warps=4 if p.h_pad <= 64 else 8)
  return call(p.q, p.k, p.v, p.q_seg, p.kv_seg)


def _backward(p: _Padded, o, lse, do, scale, causal, block_q, block_k, schedule, interpret):
  b, n = p.q.shape[:2]
  nq, nk = p.t_pad // block_q, p.s_pad // block_k
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  args = (p.q, p.k, p.v, p.q_seg, p.kv_seg, do, lse, delta)
  common = dict(scale=scale, causal=causal, kv_len=p.s)
  if schedule == "loop":
    dkv_sp = dq_sp = _Specs(block_q, block_k, p.t_pad, p.s_pad)
    whole = True
    dkv_kernel = functools.partial(_dkv_kernel, block_q=block_q, **common)
    dq_kernel = functools.partial(_dq_kernel, block_k=block_k, **common)
    dkv_grid, dq_grid, dkv_scratch, dq_scratch = (b, n, nk), (b, n, nq), [], []
  else:
    whole = False
    first_q = lambda x, y: jnp.minimum(jnp.maximum(y, x * block_k // block_q), nq - 1)
    last_kv = lambda x, y: jnp.minimum(y, ((x + 1) * block_q - 1) // block_k)
    dkv_sp = _Specs(block_q, block_k, p.t_pad, p.s_pad, first_q if causal else lambda x, y: y,
                    lambda x, y: x)
    dq_sp = _Specs(block_q, block_k, p.t_pad, p.s_pad, lambda x, y: x,
                   last_kv if causal else lambda x, y: y)
    dkv_kernel = functools.partial(_dkv_grid_kernel, **common)
    dq_kernel = functools.partial(_dq_grid_kernel, **common)
    dkv_grid, dq_grid = (b, n, nk, nq), (b, n, nq, nk)
    dkv_scratch, dq_scratch = [(block_k, p.h_pad), (block_k, p.v_pad)], [(block_q, p.h_pad)]
  sp = dkv_sp  # Key side tiled, query side whole (loop) or walked (grid).
  dk, dv = _call(
      dkv_kernel, dkv_grid,
      [sp.q(p.h_pad, whole), sp.kv(p.h_pad), sp.kv(p.v_pad), sp.q_seg(whole), sp.kv_seg(),
       sp.q(p.v_pad, whole), sp.q(1, whole), sp.q(1, whole)],
      [sp.kv(p.h_pad), sp.kv(p.v_pad)],
      [jax.ShapeDtypeStruct(p.k.shape, p.k.dtype), jax.ShapeDtypeStruct(p.v.shape, p.v.dtype)],
      dkv_scratch, "flash_attention_dkv", interpret, num_warps=8)(*args)
  sp = dq_sp  # Query side tiled.
  dq = _call(
      dq_kernel, dq_grid,
      [sp.q(p.h_pad), sp.kv(p.h_pad, whole), sp.kv(p.v_pad, whole), sp.q_seg(),
       sp.kv_seg(whole), sp.q(p.v_pad), sp.q(1), sp.q(1)],
      sp.q(p.h_pad), jax.ShapeDtypeStruct(p.q.shape, p.q.dtype),
      dq_scratch, "flash_attention_dq", interpret, num_warps=8)(*args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal, block_q, block_k, schedule,
           interpret):
  return _flash_fwd(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal, block_q, block_k,
                    schedule, interpret)[0]


def _flash_fwd(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal, block_q, block_k, schedule,
               interpret):
  p = _Padded(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, block_q, block_k)
  o, lse = _forward(p, scale, causal, block_q, block_k, schedule, interpret)
  return _Padded.from_kernel(o, p.t, p.v_size), (q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, o, lse)


def _flash_bwd(scale, causal, block_q, block_k, schedule, interpret, residuals, do_BTNV):
  q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, o, lse = residuals
  p = _Padded(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, block_q, block_k)
  do = _Padded.to_kernel(do_BTNV.astype(o.dtype), p.t_pad, p.v_pad)
  dq, dk, dv = _backward(p, o, lse, do, scale, causal, block_q, block_k, schedule, interpret)
  return (_Padded.from_kernel(dq, p.t, p.h), _Padded.from_kernel(dk, p.s, p.h),
          _Padded.from_kernel(dv, p.s, p.v_size), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale: float, causal: bool = True,
                    block_q: Optional[int] = None, block_k: Optional[int] = None,
                    schedule: Optional[str] = None, interpret: bool = False):
  """The Pallas kernel: same contract as `reference_attention`, differentiable.

  q [B, T, N, H], k [B, S, N, H], v [B, S, N, V], segment ids [B, max(T, S)] (None: one segment).
  Blocks are powers of two >= 16 (None: 128 on TPU, 64 elsewhere), clipped to the sequence.
  `schedule`: "loop" (GPU) or "grid" (TPU), see the module docstring; None picks by backend.
  """
  b, t, n, h = q_BTNH.shape
  if k_BSNH.shape[:3] != (b, k_BSNH.shape[1], n) or k_BSNH.shape[-1] != h:
    raise ValueError(f"flash_attention: k shape {k_BSNH.shape} does not match q {q_BTNH.shape}")
  if v_BSNV.shape[:3] != k_BSNH.shape[:3]:
    raise ValueError(f"flash_attention: v shape {v_BSNV.shape} does not match k {k_BSNH.shape}")
  tpu = jax.default_backend() == "tpu"
  if schedule is None:
    schedule = "grid" if tpu else "loop"
  if schedule not in SCHEDULES:
    raise ValueError(f"flash_attention: schedule must be one of {SCHEDULES}, got {schedule!r}")
  default = 128 if tpu else 64  # 64: Triton's registers at a padded qk head of 256.
  block_q = default if block_q is None else block_q
  block_k = default if block_k is None else block_k
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block < 16 or block & (block - 1):
      raise ValueError(f"flash_attention: {name} must be a power of two >= 16, got {block}")
  s = k_BSNH.shape[1]
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((b, max(t, s)), jnp.int32)
  block_q = min(block_q, max(16, 1 << (t - 1).bit_length()))
  block_k = min(block_k, max(16, 1 << (s - 1).bit_length()))
  return _flash(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, float(scale), bool(causal), block_q,
                block_k, schedule, bool(interpret))
