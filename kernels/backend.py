"""Where the Pallas kernels run: compiled on TPU/GPU, interpreted elsewhere, Triton on GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
  """The least multiple of m that is >= x."""
  return -(-x // m) * m


def dot_f32(a, b):
  """a @ b accumulated in float32 (the kernels' inner products)."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def on_accelerator() -> bool:
  """True on TPU or GPU, where the kernels compile; elsewhere they run interpreted."""
  return jax.default_backend() in ("tpu", "gpu")


def compiler_params(num_warps: int = 4, num_stages: int = 2, dimension_semantics=None):
  """Triton parameters on GPU: they also select the Triton lowering, which these kernels are
  written for (jax 0.10 lowers to Mosaic GPU unless told otherwise). On TPU the grid axes'
  semantics ("parallel" / "arbitrary"), when given. None elsewhere."""
  backend = jax.default_backend()
  if backend == "gpu":
    from jax.experimental.pallas import triton as pltriton  # Deferred: GPU-only lowering.
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if backend == "tpu" and dimension_semantics is not None:
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))
  return None
