"""The attention switch: one entry point, `attention`, over the reference, chunked, Pallas and
cuDNN paths.

  "xla"     `reference_attention`: dense float32 softmax with the mask built from segment ids.
  "chunked" `chunked_attention`: per block of queries, each against only the keys it can
            causally see, with a backward that recomputes the probabilities.
  "native"  `native_attention`: the fused flash-attention C++ kernel for XLA:CPU, built on first
            use; the fast path on CPU.
  "pallas"  the flash kernel (`kernels.flash_attention`); interpreted off TPU/GPU (for tests).
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, float16/bfloat16:
            the value head is zero-padded up to the qk head size (cuDNN wants one head size).
  "auto"    "pallas" on TPU/GPU; on CPU "native" where it builds, else "chunked".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.backend import on_accelerator
from kernels.chunked_attention import chunked_attention
from kernels.flash_attention import flash_attention, reference_attention
from kernels.native_attention import available as native_available
from kernels.native_attention import native_attention

IMPLS = ("auto", "xla", "chunked", "native", "pallas", "cudnn")


def resolve_impl(impl: str) -> str:
  """The concrete path `impl` names on this backend."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    if on_accelerator():
      return "pallas"
    return "native" if jax.default_backend() == "cpu" and native_available() else "chunked"
  return impl


def join_heads(x, heads: int):
  """Queries or keys as one [B, L, N, H] array: a (nope, rope) pair concatenated along the head,
  a rotary part shared by every head (one head) broadcast to `heads` first."""
  if not isinstance(x, (tuple, list)):
    return x
  nope, rope = x
  rope = jnp.broadcast_to(rope, rope.shape[:2] + (heads,) + rope.shape[3:])
  return jnp.concatenate([nope, rope.astype(nope.dtype)], axis=-1)


def nn_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale: float, causal: bool = True,
                 implementation: str = "cudnn"):
  """`jax.nn.dot_product_attention` with a segment mask; v zero-padded to the qk head size."""
  b, t, _, h = q_BTNH.shape
  s, v = k_BSNH.shape[1], v_BSNV.shape[-1]
  if v > h:
    raise ValueError(f"nn_attention: value head {v} larger than the qk head {h}")
  v_pad = jnp.pad(v_BSNV, ((0, 0), (0, 0), (0, 0), (0, h - v)))
  mask = None
  if segment_ids_BT is not None:
    mask = (segment_ids_BT[:, None, :t, None] == segment_ids_BT[:, None, None, :s])
  out = jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_pad, mask=mask, scale=scale,
                                     is_causal=causal, implementation=implementation)
  return out[..., :v]


def attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale: float, causal: bool = True,
              impl: str = "auto"):
  """softmax(q k^T * scale) v over [B, T, N, H] x [B, S, N, H] x [B, S, N, V] -> [B, T, N, V].

  Queries and keys may each be a (nope, rope) pair whose parts concatenate along the head, the
  rotary key possibly shared by every head ([B, S, 1, Hr], MLA's decoupled RoPE): the native
  kernel reads the parts as they are; the other paths join them first (`join_heads`).
  Keys are visible within the query's segment (segment ids [B, max(T, S)]; None: one segment per
  row) and, when causal, at positions <= the query's. A query with no visible key gets zeros
  (on "xla" and "pallas"; cuDNN's own convention otherwise).
  """
  impl = resolve_impl(impl)
  if impl == "native":
    return native_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal)
  heads = v_BSNV.shape[2]
  q_BTNH, k_BSNH = join_heads(q_BTNH, heads), join_heads(k_BSNH, heads)
  if impl == "xla":
    return reference_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal)
  if impl == "chunked":
    return chunked_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(f"attention impl 'cudnn' needs a GPU, backend is {jax.default_backend()!r}")
    return nn_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal)
  return flash_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale, causal,
                         interpret=not on_accelerator())
