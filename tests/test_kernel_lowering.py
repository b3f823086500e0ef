"""The Pallas kernels lower, forward and backward, for GPU (Triton) and TPU (Mosaic) from this CPU.

Lowering runs the Pallas -> Triton / Mosaic translation (op support, block shapes, power-of-two
and (8, 128) tiling rules); compiling and running on the chip is not covered here. The wrappers
pick pads and compiler parameters from `jax.default_backend()`, which the tests point at the
target platform.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels.flash_attention import flash_attention
from kernels.grouped_matmul_pallas import pallas_grouped_matmul


def _lowered_kernels(platform: str):
  """Lowered text of forward + backward of each kernel (fresh functions: no trace-cache reuse)."""
  def flash_fwd_bwd(q, k, v, segment_ids):
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, segment_ids, 0.1), q, k, v)
    return out, vjp(out)

  def gmm_fwd_bwd(lhs, rhs, sizes):
    out, vjp = jax.vjp(lambda l, r: pallas_grouped_matmul(l, r, sizes), lhs, rhs)
    return out, vjp(out)

  bf16 = jnp.bfloat16
  q = jax.ShapeDtypeStruct((1, 200, 2, 192), bf16)  # MLA heads; T not a multiple of the block.
  v = jax.ShapeDtypeStruct((1, 200, 2, 128), bf16)
  seg = jax.ShapeDtypeStruct((1, 200), jnp.int32)
  lhs, rhs = jax.ShapeDtypeStruct((300, 200), bf16), jax.ShapeDtypeStruct((6, 200, 136), bf16)
  sizes = jax.ShapeDtypeStruct((6,), jnp.int32)
  return [jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
          for fn, args in ((flash_fwd_bwd, (q, q, v, seg)), (gmm_fwd_bwd, (lhs, rhs, sizes)))]


def test_lowers_to_triton(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for text in _lowered_kernels("cuda"):
    assert text.count("__gpu$xla.gpu.triton") == 3  # Forward and the two backward kernels.


def test_lowers_to_mosaic(monkeypatch):
  tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
  if not hasattr(tpu_info, "get_device_kind"):
    pytest.skip("this jax has no tpu_info.get_device_kind to point at a TPU v5e")
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  for text in _lowered_kernels("tpu"):
    assert text.count("tpu_custom_call") == 3
