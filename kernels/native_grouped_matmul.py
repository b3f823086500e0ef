"""Grouped matmul for XLA:CPU: a C++ kernel (kernels/csrc/grouped_matmul_cpu.cc) called through
XLA's FFI, with its gradients as two more grouped products of the same kernel.

The blocked JAX path (`kernels.grouped_matmul.blocked_grouped_matmul`) pads each group to whole
blocks and copies every block's weights; on the benchmark shapes that, and its backward's
[blocks, K, N] weight gradients, made the routed experts several times slower than the same
FLOPs as one batched matmul. The kernel multiplies each group's own rows by the group's weights
read in place. Built on first use by `kernels.native_build`; where it cannot be built
`available()` is False with the reason in `unavailable_reason()`.

Numerics: float32 accumulation (other dtypes are cast in and back out); the same contract as
`jax.lax.ragged_dot`: rows past sum(group sizes) get zero output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.native_build import CSRC, NativeLibrary

_TARGET = "deepjax_grouped_matmul_cpu"
_LIBRARY = NativeLibrary(CSRC / "grouped_matmul_cpu.cc", {_TARGET: "GroupedMatmulCpu"})
_NN, _NT, _TN = 0, 1, 2  # The kernel's modes: lhs x rhs[g], lhs x rhs[g]^T, lhs_g^T x rhs_g.


def available() -> bool:
  """Whether the CPU kernel is built and registered in this process (builds it if needed)."""
  return _LIBRARY.available()


def unavailable_reason() -> str | None:
  """Why the kernel could not be built or loaded, or None when it is available."""
  return _LIBRARY.unavailable_reason()


def _call(mode: int, lhs, rhs, sizes_G, out_shape):
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(
      lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes_G.astype(jnp.int32),
      mode=np.int32(mode))


@jax.custom_vjp
def _grouped_matmul(lhs_MK, rhs_GKN, sizes_G):
  m, n = lhs_MK.shape[0], rhs_GKN.shape[2]
  return _call(_NN, lhs_MK, rhs_GKN, sizes_G, (m, n)).astype(lhs_MK.dtype)


def _forward(lhs_MK, rhs_GKN, sizes_G):
  return _grouped_matmul(lhs_MK, rhs_GKN, sizes_G), (lhs_MK, rhs_GKN, sizes_G)


def _backward(residuals, d_out_MN):
  lhs_MK, rhs_GKN, sizes_G = residuals
  d_lhs = _call(_NT, d_out_MN, rhs_GKN, sizes_G, lhs_MK.shape)
  d_rhs = _call(_TN, lhs_MK, d_out_MN, sizes_G, rhs_GKN.shape)
  return d_lhs.astype(lhs_MK.dtype), d_rhs.astype(rhs_GKN.dtype), None


_grouped_matmul.defvjp(_forward, _backward)


def native_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G):
  """[M, K] rows sorted by group times their group's [K, N] weights -> [M, N], on the CPU kernel.

  Rows past sum(group sizes) get zero output and no gradient. Raises RuntimeError (with the
  build's reason) where the kernel is unavailable.
  """
  if not available():
    raise RuntimeError(f"grouped_matmul impl 'native' is unavailable: {unavailable_reason()}")
  return _grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G)
