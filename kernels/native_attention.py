"""Fused flash attention for XLA:CPU: a C++ kernel (kernels/csrc/flash_attention_cpu.cc) called
through XLA's FFI, forward and a recomputing backward.

XLA:CPU cannot fuse a matmul with the softmax around it, so attention written in JAX streams each
block of scores through memory several times; that traffic, not the FLOPs, was most of the train
step's time on CPU. The kernel keeps each 32 x 64 tile of scores in cache from its matmul to its
use. It is built from source on first use (`kernels.native_build`: the system's C++ compiler,
`-O3 -march=native`, a cache keyed by source, flags, compiler, jaxlib and CPU). Where no compiler
works `available()` is False with the reason in `unavailable_reason()`, and `impl="auto"` keeps
the chunked JAX path.

Numerics as `flash_attention.reference_attention`: float32 throughout (other dtypes are cast),
masked keys excluded, a query that sees no key gets a zero output and zero gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.native_build import CSRC, NativeLibrary

SOURCE = CSRC / "flash_attention_cpu.cc"
_FORWARD, _BACKWARD = "deepjax_flash_attention_cpu_fwd", "deepjax_flash_attention_cpu_bwd"
_LIBRARY = NativeLibrary(SOURCE, {_FORWARD: "FlashAttentionForward",
                                  _BACKWARD: "FlashAttentionBackward"})


def build():
  """Compiles the kernel (unless a cached build exists) and returns the shared library's path;
  RuntimeError naming the compiler command when the build fails (`native_build.build`)."""
  return _LIBRARY.build()


def available() -> bool:
  """Whether the CPU kernel is built and registered in this process (builds it if needed)."""
  return _LIBRARY.available()


def unavailable_reason() -> str | None:
  """Why the kernel could not be built or loaded, or None when it is available."""
  return _LIBRARY.unavailable_reason()


def _call(name, results, *operands, scale: float, causal: bool):
  return jax.ffi.ffi_call(name, results, vmap_method="sequential")(
      *operands, scale=np.float32(scale), causal=np.int32(causal))


def _forward(q_nope, q_rope, k_nope, k_rope, v_BSNV, segment_ids_BL, scale, causal):
  b, t, n, _ = q_nope.shape
  operands = tuple(x.astype(jnp.float32) for x in (q_nope, q_rope, k_nope, k_rope, v_BSNV))
  out_BTNV, lse_BNT = _call(
      _FORWARD, (jax.ShapeDtypeStruct((b, t, n, v_BSNV.shape[-1]), jnp.float32),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      *operands, segment_ids_BL.astype(jnp.int32), scale=scale, causal=causal)
  residuals = ((q_nope, q_rope, k_nope, k_rope, v_BSNV), segment_ids_BL, out_BTNV, lse_BNT)
  return out_BTNV.astype(v_BSNV.dtype), residuals


def _backward(scale, causal, residuals, dout_BTNV):
  inputs, segment_ids_BL, out_BTNV, lse_BNT = residuals
  operands = tuple(x.astype(jnp.float32) for x in inputs)
  q_nope, q_rope, k_nope, k_rope, v_BSNV = operands
  b, s, n = k_nope.shape[:3]
  shapes = (q_nope.shape, q_rope.shape, k_nope.shape, (b, s, n, k_rope.shape[-1]), v_BSNV.shape)
  grads = _call(_BACKWARD, tuple(jax.ShapeDtypeStruct(x, jnp.float32) for x in shapes),
                *operands, segment_ids_BL.astype(jnp.int32), out_BTNV, lse_BNT,
                dout_BTNV.astype(jnp.float32), scale=scale, causal=causal)
  dq_nope, dq_rope, dk_nope, dk_rope, dv = grads
  if k_rope.shape[2] != n:  # A rotary key shared by every head: the heads' gradients add up.
    dk_rope = dk_rope.sum(2, keepdims=True)
  grads = (dq_nope, dq_rope, dk_nope, dk_rope, dv)
  return tuple(g.astype(x.dtype) for g, x in zip(grads, inputs)) + (None,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _native(q_nope, q_rope, k_nope, k_rope, v_BSNV, segment_ids_BL, scale, causal):
  return _forward(q_nope, q_rope, k_nope, k_rope, v_BSNV, segment_ids_BL, scale, causal)[0]


_native.defvjp(_forward, _backward)


def _split_heads(x):
  """(per-head part, rotary part) of queries or keys given whole ([B, L, N, H]: a zero-width
  rotary part) or as a (nope [B, L, N, Hn], rope [B, L, N or 1, Hr]) pair."""
  if isinstance(x, (tuple, list)):
    return tuple(x)
  return x, x[..., :0]


def native_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale: float,
                     causal: bool = True) -> jax.Array:
  """Same contract as `flash_attention.reference_attention`, on the fused CPU kernel.

  Queries and keys may each come as a (nope, rope) pair, the parts concatenated along the head
  without being materialised: MLA's decoupled RoPE, whose rotary key [B, S, 1, Hr] is shared by
  every head (`kernels.attention.join_heads` gives the equivalent single arrays). Segment ids
  [B, max(T, S)]: queries use the first T, keys the first S (None: one segment). Raises
  RuntimeError (with the build's reason) where the kernel is unavailable.
  """
  if not available():
    raise RuntimeError(f"attention impl 'native' is unavailable: {unavailable_reason()}")
  q_nope, q_rope = _split_heads(q_BTNH)
  k_nope, k_rope = _split_heads(k_BSNH)
  b, t = q_nope.shape[:2]
  s = k_nope.shape[1]
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((b, max(t, s)), jnp.int32)
  return _native(q_nope, q_rope, k_nope, k_rope, v_BSNV, segment_ids_BT, float(scale),
                 bool(causal))
