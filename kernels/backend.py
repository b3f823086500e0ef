"""Where the Pallas kernels run: compiled on TPU/GPU, interpreted elsewhere, Triton on GPU."""

from __future__ import annotations

import jax


def on_accelerator() -> bool:
  """True on TPU or GPU, where the kernels compile; elsewhere they run interpreted."""
  return jax.default_backend() in ("tpu", "gpu")


def compiler_params(num_warps: int = 4, num_stages: int = 2):
  """Triton parameters on GPU: they also select the Triton lowering, which these kernels are
  written for (jax 0.10 lowers to Mosaic GPU unless told otherwise). None elsewhere."""
  if jax.default_backend() != "gpu":
    return None
  from jax.experimental.pallas import triton as pltriton  # Deferred: GPU-only lowering.
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
