"""Flash attention for MLA shapes (qk head size H != value head size V), forward and backward.

`flash_attention` is a Pallas kernel with a `jax.custom_vjp` whose backward is two more Pallas
kernels (one owning a block of keys for dK/dV, one owning a block of queries for dQ), each
recomputing the probabilities from the saved log-sum-exp. `reference_attention` is the pure-JAX
definition both must match.

Numerics: logits and softmax statistics in float32, online softmax (running max and sum) over key
blocks, explicit `scale`, causal and segment masks applied inside each block. A query whose every
key is masked gets a zero output (and zero gradients), never NaN.

Layout and padding, done in the wrapper: heads move in front of time ([B, N, T, H]) so each block
is a 2-D [time, head] tile; time is padded to a multiple of the block sizes, head sizes to a
power of two of at least 16 (Triton's block shapes; on TPU to a multiple of 128, Mosaic's lane
tile). Padded keys are masked by position, padded head columns are zeros, padded query rows
are sliced off. One kernel body serves Triton (GPU) and Mosaic (TPU): it keeps to 2-D tiles,
`pl.ds` slices of whole-sequence refs and `jnp.dot` with float32 accumulation.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.backend import compiler_params

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # Finite: exp(MASK - MASK) stays defined.


def reference_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale: float, causal: bool = True):
  """softmax(q k^T * scale) v in float32, causal (top-left aligned) and within segments.

  Segment ids [B, max(T, S)]: queries use the first T, keys the first S (None: one segment).
  """
  t, s = q_BTNH.shape[1], k_BSNH.shape[1]
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((q_BTNH.shape[0], max(t, s)), jnp.int32)
  mask_BTS = segment_ids_BT[:, :t, None] == segment_ids_BT[:, None, :s]
  if causal:
    mask_BTS = mask_BTS & jnp.tril(jnp.ones((t, s), bool))[None]
  logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH,
                           preferred_element_type=jnp.float32) * scale
  logits_BNTS = jnp.where(mask_BTS[:, None], logits_BNTS, MASK_VALUE)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1) * mask_BTS[:, None]  # Empty rows -> 0.
  out_BTNV = jnp.einsum("BNTS,BSNV->BTNV", probs_BNTS.astype(v_BSNV.dtype), v_BSNV,
                        preferred_element_type=jnp.float32)
  return out_BTNV.astype(v_BSNV.dtype)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _padded_head(size: int) -> int:
  """Triton wants power-of-two block dims (>= 16 for its dots); Mosaic wants 128 lanes."""
  if jax.default_backend() == "tpu":
    return _round_up(size, 128)
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


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _kv_blocks(q_block, block_q: int, block_k: int, num_k: int, causal: bool):
  """Number of key blocks query block `q_block` needs (all of them unless causal)."""
  if not causal:
    return num_k
  return jnp.minimum(num_k, ((q_block + 1) * block_q + block_k - 1) // block_k)


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *,
                    scale, causal, block_k, kv_len):
  block_q = q_ref.shape[0]
  q_block = pl.program_id(2)
  q_QH = q_ref[...]
  q_seg_Q1 = q_seg_ref[...]

  def body(j, carry):
    acc_QV, m_Q1, l_Q1 = carry
    keys = pl.ds(j * block_k, block_k)
    k_KH, v_KV = k_ref[keys, :], v_ref[keys, :]
    mask = _block_mask(q_seg_Q1, kv_seg_ref[:, keys], q_block * block_q, j * block_k, kv_len,
                       causal)
    s_QK = jnp.where(mask, _dot(q_QH, k_KH.T) * scale, MASK_VALUE)
    m_new = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
    p_QK = jnp.where(mask, jnp.exp(s_QK - m_new), 0.0)
    alpha = jnp.exp(m_Q1 - m_new)
    l_new = alpha * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True)
    acc_new = alpha * acc_QV + _dot(p_QK.astype(v_KV.dtype), v_KV)
    return acc_new, m_new, l_new

  carry = (jnp.zeros((block_q, v_ref.shape[1]), jnp.float32),
           jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
           jnp.zeros((block_q, 1), jnp.float32))
  num_k = _kv_blocks(q_block, block_q, block_k, k_ref.shape[0] // block_k, causal)
  acc_QV, m_Q1, l_Q1 = jax.lax.fori_loop(0, num_k, body, carry)
  l_safe = jnp.where(l_Q1 == 0.0, 1.0, l_Q1)  # Fully masked rows: output 0, not 0/0.
  o_ref[...] = (acc_QV / l_safe).astype(o_ref.dtype)
  lse_ref[...] = m_Q1 + jnp.log(l_safe)


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale, causal, block_q, kv_len):
  block_k = k_ref.shape[0]
  kv_block = pl.program_id(2)
  k_KH, v_KV = k_ref[...], v_ref[...]
  kv_seg_1K = kv_seg_ref[...]

  def body(i, carry):
    dk_KH, dv_KV = carry
    rows = pl.ds(i * block_q, block_q)
    q_QH, do_QV = q_ref[rows, :], do_ref[rows, :]
    mask = _block_mask(q_seg_ref[rows, :], kv_seg_1K, i * block_q, kv_block * block_k, kv_len,
                       causal)
    p_QK = jnp.where(mask, jnp.exp(_dot(q_QH, k_KH.T) * scale - lse_ref[rows, :]), 0.0)
    dv_KV = dv_KV + _dot(p_QK.astype(do_QV.dtype).T, do_QV)
    ds_QK = p_QK * (_dot(do_QV, v_KV.T) - delta_ref[rows, :]) * scale
    dk_KH = dk_KH + _dot(ds_QK.astype(q_QH.dtype).T, q_QH)
    return dk_KH, dv_KV

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
  lse_Q1, delta_Q1 = lse_ref[...], delta_ref[...]

  def body(j, dq_QH):
    keys = pl.ds(j * block_k, block_k)
    k_KH, v_KV = k_ref[keys, :], v_ref[keys, :]
    mask = _block_mask(q_seg_Q1, kv_seg_ref[:, keys], q_block * block_q, j * block_k, kv_len,
                       causal)
    p_QK = jnp.where(mask, jnp.exp(_dot(q_QH, k_KH.T) * scale - lse_Q1), 0.0)
    ds_QK = p_QK * (_dot(do_QV, v_KV.T) - delta_Q1) * scale
    return dq_QH + _dot(ds_QK.astype(k_KH.dtype), k_KH)

  num_k = _kv_blocks(q_block, block_q, block_k, k_ref.shape[0] // block_k, causal)
  dq_QH = jax.lax.fori_loop(0, num_k, body, jnp.zeros(q_QH.shape, jnp.float32))
  dq_ref[...] = dq_QH.astype(dq_ref.dtype)


def _specs(block_q, block_k, t_pad, s_pad):
  """BlockSpecs over a (B, N, blocks) grid: a `row` tile of `block`, or the whole sequence."""
  tile = lambda rows, width: pl.BlockSpec((None, None, rows, width), lambda b, n, i: (b, n, i, 0))
  whole = lambda rows, width: pl.BlockSpec((None, None, rows, width), lambda b, n, i: (b, n, 0, 0))
  return dict(
      tile=tile, whole=whole,
      q_seg_tile=pl.BlockSpec((None, block_q, 1), lambda b, n, i: (b, i, 0)),
      q_seg_whole=pl.BlockSpec((None, t_pad, 1), lambda b, n, i: (b, 0, 0)),
      kv_seg_tile=pl.BlockSpec((None, 1, block_k), lambda b, n, i: (b, 0, i)),
      kv_seg_whole=pl.BlockSpec((None, 1, s_pad), lambda b, n, i: (b, 0, 0)))


class _Padded:
  """Kernel layout: [B, N, T_pad, H_pad] etc.; segment ids [B, T_pad, 1] and [B, 1, S_pad]."""

  def __init__(self, q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, block_q, block_k):
    t, s, h, v = q_BTNH.shape[1], k_BSNH.shape[1], q_BTNH.shape[-1], v_BSNV.shape[-1]
    self.t, self.s, self.h, self.v_size = t, s, h, v
    self.t_pad, self.s_pad = _round_up(t, block_q), _round_up(s, block_k)
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


def _forward(p: _Padded, scale, causal, block_q, block_k, interpret):
  b, n = p.q.shape[:2]
  sp = _specs(block_q, block_k, p.t_pad, p.s_pad)
  kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, block_k=block_k,
                             kv_len=p.s)
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, n, p.t_pad // block_q),
      in_specs=[sp["tile"](block_q, p.h_pad), sp["whole"](p.s_pad, p.h_pad),
                sp["whole"](p.s_pad, p.v_pad), sp["q_seg_tile"], sp["kv_seg_whole"]],
      out_specs=[sp["tile"](block_q, p.v_pad), sp["tile"](block_q, 1)],
      out_shape=[jax.ShapeDtypeStruct((b, n, p.t_pad, p.v_pad), p.v.dtype),
                 jax.ShapeDtypeStruct((b, n, p.t_pad, 1), jnp.float32)],
      compiler_params=compiler_params(num_warps=4 if p.h_pad <= 64 else 8),
      interpret=interpret, name="flash_attention_forward",
  )(p.q, p.k, p.v, p.q_seg, p.kv_seg)
  return o, lse


def _backward(p: _Padded, o, lse, do, scale, causal, block_q, block_k, interpret):
  b, n = p.q.shape[:2]
  sp = _specs(block_q, block_k, p.t_pad, p.s_pad)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  args = (p.q, p.k, p.v, p.q_seg, p.kv_seg, do, lse, delta)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=block_q, kv_len=p.s),
      grid=(b, n, p.s_pad // block_k),
      in_specs=[sp["whole"](p.t_pad, p.h_pad), sp["tile"](block_k, p.h_pad),
                sp["tile"](block_k, p.v_pad), sp["q_seg_whole"], sp["kv_seg_tile"],
                sp["whole"](p.t_pad, p.v_pad), sp["whole"](p.t_pad, 1), sp["whole"](p.t_pad, 1)],
      out_specs=[sp["tile"](block_k, p.h_pad), sp["tile"](block_k, p.v_pad)],
      out_shape=[jax.ShapeDtypeStruct(p.k.shape, p.k.dtype),
                 jax.ShapeDtypeStruct(p.v.shape, p.v.dtype)],
      compiler_params=compiler_params(num_warps=8),
      interpret=interpret, name="flash_attention_dkv",
  )(*args)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, causal=causal, block_k=block_k, kv_len=p.s),
      grid=(b, n, p.t_pad // block_q),
      in_specs=[sp["tile"](block_q, p.h_pad), sp["whole"](p.s_pad, p.h_pad),
                sp["whole"](p.s_pad, p.v_pad), sp["q_seg_tile"], sp["kv_seg_whole"],
                sp["tile"](block_q, p.v_pad), sp["tile"](block_q, 1), sp["tile"](block_q, 1)],
      out_specs=sp["tile"](block_q, p.h_pad),
      out_shape=jax.ShapeDtypeStruct(p.q.shape, p.q.dtype),
      compiler_params=compiler_params(num_warps=8),
      interpret=interpret, name="flash_attention_dq",
  )(*args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal, block_q, block_k, interpret):
  return _flash_fwd(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal, block_q, block_k,
                    interpret)[0]


def _flash_fwd(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal, block_q, block_k, interpret):
  p = _Padded(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, block_q, block_k)
  o, lse = _forward(p, scale, causal, block_q, block_k, interpret)
  return _Padded.from_kernel(o, p.t, p.v_size), (q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, o, lse)


def _flash_bwd(scale, causal, block_q, block_k, interpret, residuals, do_BTNV):
  q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, o, lse = residuals
  p = _Padded(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, block_q, block_k)
  do = _Padded.to_kernel(do_BTNV.astype(o.dtype), p.t_pad, p.v_pad)
  dq, dk, dv = _backward(p, o, lse, do, scale, causal, block_q, block_k, interpret)
  return (_Padded.from_kernel(dq, p.t, p.h), _Padded.from_kernel(dk, p.s, p.h),
          _Padded.from_kernel(dv, p.s, p.v_size), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale: float, causal: bool = True,
                    block_q: Optional[int] = None, block_k: Optional[int] = None,
                    interpret: bool = False):
  """The Pallas kernel: same contract as `reference_attention`, differentiable.

  q [B, T, N, H], k [B, S, N, H], v [B, S, N, V], segment ids [B, max(T, S)] (None: one segment).
  Blocks are powers of two >= 16 (None: 128 on TPU, 64 elsewhere), clipped to the sequence.
  """
  b, t, n, h = q_BTNH.shape
  if k_BSNH.shape[:3] != (b, k_BSNH.shape[1], n) or k_BSNH.shape[-1] != h:
    raise ValueError(f"flash_attention: k shape {k_BSNH.shape} does not match q {q_BTNH.shape}")
  if v_BSNV.shape[:3] != k_BSNH.shape[:3]:
    raise ValueError(f"flash_attention: v shape {v_BSNV.shape} does not match k {k_BSNH.shape}")
  default = 128 if jax.default_backend() == "tpu" else 64  # 64: Triton registers at H = 256.
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
                block_k, bool(interpret))
