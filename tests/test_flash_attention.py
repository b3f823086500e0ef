"""Flash attention (Pallas, interpret mode on CPU) and the chunked attention against the pure-JAX
reference, forward and gradients: odd sizes (T not a multiple of the block, qk head 12 != value head 6), several segments
per row, causal on and off, queries that see no key.

Tolerances (float32): outputs atol 2e-5, gradients atol 1e-4 (both rtol 1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import attention, nn_attention, resolve_impl
from kernels.chunked_attention import chunked_attention, default_block
from kernels.flash_attention import flash_attention, reference_attention
from kernels.native_attention import available as native_available
from model.transformer import forward, init_model
from tests.conftest import small_config


def _inputs(b, t, s, n, h, v, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, s, n, h)),
          jax.random.normal(ks[2], (b, s, n, v)), jax.random.normal(ks[3], (b, t, n, v)))


def _out_and_grads(fn, q, k, v, cotangent):
  """One jitted function: output and (dq, dk, dv) for the given output cotangent."""
  @jax.jit
  def run(q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)
  return run(q, k, v, cotangent)


def _assert_parity(got, want):
  (out, grads), (ref_out, ref_grads) = got, want
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
  for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("schedule", ["loop", "grid"])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_with_segments(causal, schedule):
  b, t, n, h, v = 2, 37, 2, 12, 6  # 37: ragged in query blocks of 16 and key blocks of 32.
  q, k, vv, cot = _inputs(b, t, t, n, h, v)
  seg = jnp.array([[1] * 10 + [2] * 20 + [3] * 7, [4] * 25 + [5] * 12])
  scale = 0.37
  kernel = lambda q, k, v: flash_attention(q, k, v, seg, scale, causal, 16, 32, schedule,
                                          interpret=True)
  reference = lambda q, k, v: reference_attention(q, k, v, seg, scale, causal)
  _assert_parity(_out_and_grads(kernel, q, k, vv, cot), _out_and_grads(reference, q, k, vv, cot))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,s,block", [(37, 37, 16), (37, 37, 64), (20, 12, 8), (12, 20, 5)])
def test_chunked_matches_reference(t, s, block, causal):
  """Blocks of queries against the keys they can see: ragged last blocks, more queries than keys
  (the later blocks see every key) and more keys than queries (the later keys are never seen)."""
  q, k, vv, cot = _inputs(2, t, s, 2, 12, 6, seed=4)
  cuts = np.sort(np.random.default_rng(t + s).choice(np.arange(1, max(t, s)), 3, replace=False))
  seg = jnp.asarray(np.searchsorted(cuts, np.arange(max(t, s)), side="right")[None].repeat(2, 0)
                    + np.array([[0], [5]]))
  chunked = lambda q, k, v: chunked_attention(q, k, v, seg, 0.37, causal, block)
  reference = lambda q, k, v: reference_attention(q, k, v, seg, 0.37, causal)
  got = _out_and_grads(chunked, q, k, vv, cot)
  assert np.any(np.asarray(got[0]) != 0)
  _assert_parity(got, _out_and_grads(reference, q, k, vv, cot))


def test_chunked_default_block_and_auto():
  assert [default_block(t) for t in (8, 128, 256, 512, 2048, 8192)] == [64, 64, 64, 128, 256, 256]
  # On CPU: the fused C++ kernel where it builds (tests/test_native_attention.py), else chunked.
  assert resolve_impl("auto") == ("native" if native_available() else "chunked")


def test_chunked_in_bfloat16_matches_reference_in_float32():
  q, k, vv, cot = _inputs(2, 70, 70, 2, 12, 6, seed=5)
  bf16 = lambda *xs: [x.astype(jnp.bfloat16) for x in xs]
  got = _out_and_grads(lambda q, k, v: chunked_attention(q, k, v, None, 0.3, True, 32),
                       *bf16(q, k, vv, cot))
  q, k, vv, cot = (x.astype(jnp.float32) for x in bf16(q, k, vv, cot))
  want = _out_and_grads(lambda q, k, v: reference_attention(q, k, v, None, 0.3, True),
                        q, k, vv, cot)
  assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
  np.testing.assert_allclose(np.asarray(got[0], np.float32), want[0], atol=2e-2, rtol=2e-2)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=5e-2, rtol=5e-2)


def test_queries_without_visible_keys_get_zeros():
  # 20 queries over 12 keys: queries 12.. are in a segment no key has, so every key is masked.
  # The grid schedule (TPU's) here; the loop schedule in the tests above and below.
  b, t, s, n, h, v = 1, 20, 12, 1, 12, 6
  q, k, vv, cot = _inputs(b, t, s, n, h, v, seed=1)
  seg = jnp.where(jnp.arange(t) < 12, 1, 9)[None]
  kernel = lambda q, k, v: flash_attention(q, k, v, seg, 0.5, True, 16, 16, "grid",
                                          interpret=True)
  reference = lambda q, k, v: reference_attention(q, k, v, seg, 0.5, True)
  got = _out_and_grads(kernel, q, k, vv, cot)
  assert np.all(np.isfinite(got[0])) and np.all(np.asarray(got[0])[:, 12:] == 0)
  _assert_parity(got, _out_and_grads(reference, q, k, vv, cot))


def test_switch_paths_agree():
  q, k, v, _ = _inputs(1, 9, 9, 2, 12, 6, seed=2)
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2]])
  want = reference_attention(q, k, v, seg, 0.3, True)
  np.testing.assert_allclose(attention(q, k, v, seg, 0.3, impl="auto"), want, atol=1e-6)
  np.testing.assert_allclose(attention(q, k, v, seg, 0.3, impl="chunked"), want, atol=1e-6)
  np.testing.assert_allclose(attention(q, k, v, seg, 0.3, impl="pallas"), want, atol=2e-5)
  # The cuDNN wrapper's padding and mask, run through jax.nn's XLA implementation.
  np.testing.assert_allclose(nn_attention(q, k, v, seg, 0.3, implementation="xla"), want,
                             atol=2e-5)


def test_bad_arguments():
  q, k, v, _ = _inputs(1, 4, 4, 1, 8, 4)
  with pytest.raises(ValueError, match="impl must be one of"):
    attention(q, k, v, None, 1.0, impl="triton")
  with pytest.raises(ValueError, match="needs a GPU"):
    attention(q, k, v, None, 1.0, impl="cudnn")
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    flash_attention(q, k, v, None, 1.0, block_q=24, interpret=True)
  with pytest.raises(ValueError, match="schedule must be one of"):
    flash_attention(q, k, v, None, 1.0, schedule="tiles", interpret=True)
  with pytest.raises(ValueError, match="does not match"):
    flash_attention(q, k[..., :4], v, None, 1.0, interpret=True)


def test_model_through_the_kernels_matches_xla():
  """ModelConfig.attention_impl / moe_impl reach the layers: Pallas (interpreted), chunked (two
  blocks of 32 queries) and the native CPU kernel (where it builds) == XLA logits."""
  tokens = jax.random.randint(jax.random.key(3), (1, 40), 0, 61)
  segments = jnp.array([[1] * 5 + [2] * 30 + [3] * 5])
  logits = {}
  impls = ("xla", "chunked", "pallas") + (("native",) if native_available() else ())
  for impl in impls:
    cfg = small_config(num_layers=2, mtp_depth=0, attention_impl=impl,
                       moe_impl=impl if impl == "pallas" else "xla")
    logits[impl] = forward(init_model(cfg, seed=0), tokens, None, segments).logits
  np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=1e-5, rtol=1e-5)
  for impl in impls[1:]:
    np.testing.assert_allclose(logits[impl], logits["xla"], atol=1e-5, rtol=1e-5, err_msg=impl)
