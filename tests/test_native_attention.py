"""The fused CPU attention kernel (kernels/native_attention.py, a C++ XLA FFI call) against the
pure-JAX reference, forward and gradients, and its build: the cache and the errors.

Shapes cover every tile case the kernel distinguishes: ragged query (32) and key (64) tiles, key
tiles skipped because no query of the tile shares their segment, fully visible tiles (one
segment, below the diagonal) and partly masked ones; more queries than keys and the reverse;
queries that see no key. Tolerances (float32) as tests/test_flash_attention.py's: outputs atol
2e-5, gradients atol 1e-4 (rtol 1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import native_attention as native
from kernels.attention import attention, join_heads, resolve_impl
from kernels.flash_attention import reference_attention
from tests.test_flash_attention import _assert_parity, _inputs, _out_and_grads

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"the native kernel did not build: {native.unavailable_reason()}")


def _segments(b, length, cuts_per_row, seed):
  """Packed rows: [b, length] segment ids, `cuts_per_row` random boundaries, distinct per row."""
  rng = np.random.default_rng(seed)
  rows = []
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, length), cuts_per_row, replace=False))
    rows.append(np.searchsorted(cuts, np.arange(length), side="right") + 10 * r)
  return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,s,n,h,v,cuts", [
    (37, 37, 2, 12, 6, 3),      # One ragged tile of each kind.
    (300, 300, 2, 24, 16, 2),   # Fully visible, masked and skipped tiles.
    (130, 70, 1, 20, 8, 1),     # More queries than keys.
    (70, 130, 3, 17, 33, 4),    # More keys than queries; head sizes not multiples of 16.
])
def test_matches_reference(t, s, n, h, v, cuts, causal):
  q, k, vv, cot = _inputs(2, t, s, n, h, v, seed=t + s)
  seg = _segments(2, max(t, s), cuts, seed=t)
  kernel = lambda q, k, v: native.native_attention(q, k, v, seg, 0.37, causal)
  reference = lambda q, k, v: reference_attention(q, k, v, seg, 0.37, causal)
  got = _out_and_grads(kernel, q, k, vv, cot)
  assert np.any(np.asarray(got[0]) != 0)
  _assert_parity(got, _out_and_grads(reference, q, k, vv, cot))


def test_one_segment_by_default_and_long_rows():
  q, k, vv, cot = _inputs(1, 520, 520, 2, 16, 16, seed=7)
  kernel = lambda q, k, v: native.native_attention(q, k, v, None, 0.25)
  reference = lambda q, k, v: reference_attention(q, k, v, None, 0.25)
  _assert_parity(_out_and_grads(kernel, q, k, vv, cot), _out_and_grads(reference, q, k, vv, cot))


def test_queries_without_visible_keys_get_zeros():
  # 20 queries over 12 keys: queries 12.. are in a segment no key has.
  q, k, vv, cot = _inputs(1, 20, 12, 1, 12, 6, seed=1)
  seg = jnp.where(jnp.arange(20) < 12, 1, 9)[None]
  kernel = lambda q, k, v: native.native_attention(q, k, v, seg, 0.5, True)
  got = _out_and_grads(kernel, q, k, vv, cot)
  assert np.all(np.isfinite(got[0])) and np.all(np.asarray(got[0])[:, 12:] == 0)
  assert np.all(np.asarray(got[1][0])[:, 12:] == 0)  # dq of the blind queries.
  reference = lambda q, k, v: reference_attention(q, k, v, seg, 0.5, True)
  _assert_parity(got, _out_and_grads(reference, q, k, vv, cot))


def test_bfloat16_inputs_keep_their_dtype():
  q, k, vv, cot = (x.astype(jnp.bfloat16) for x in _inputs(2, 40, 40, 2, 12, 6, seed=5))
  out, grads = _out_and_grads(lambda q, k, v: native.native_attention(q, k, v, None, 0.3),
                              q, k, vv, cot)
  f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
  want = _out_and_grads(lambda q, k, v: reference_attention(q, k, v, None, 0.3), *f32(q, k, vv, cot))
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(np.asarray(out, np.float32), want[0], atol=2e-2, rtol=2e-2)


def test_auto_picks_native_on_cpu_and_chunked_without_it(monkeypatch):
  assert resolve_impl("auto") == "native"
  q, k, v, _ = _inputs(1, 9, 9, 2, 12, 6, seed=2)
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2]])
  np.testing.assert_allclose(attention(q, k, v, seg, 0.3, impl="native"),
                             reference_attention(q, k, v, seg, 0.3, True), atol=1e-6)
  monkeypatch.setattr("kernels.attention.native_available", lambda: False)
  assert resolve_impl("auto") == "chunked"


def test_vmap_runs_row_by_row():
  q, k, vv, _ = _inputs(3, 33, 33, 2, 8, 8, seed=6)
  got = jax.vmap(lambda q, k, v: native.native_attention(q[None], k[None], v[None], None, 0.5))(
      q, k, vv)
  np.testing.assert_allclose(got[:, 0], reference_attention(q, k, vv, None, 0.5), atol=2e-5)


def test_build_is_cached_and_failures_name_the_command(tmp_path, monkeypatch):
  monkeypatch.setenv("DEEPJAX_KERNEL_CACHE", str(tmp_path))
  first = native.build()
  assert first.parent == tmp_path and first.exists()
  stamp = first.stat().st_mtime_ns
  assert native.build() == first and first.stat().st_mtime_ns == stamp  # Not rebuilt.
  monkeypatch.setenv("CXX", "false")  # A "compiler" that always fails.
  with pytest.raises(RuntimeError, match=r"building flash_attention_cpu.cc failed: false "):
    native.build()
  assert list(tmp_path.glob("*.so")) == [first]  # A failed build leaves nothing half-written.


@pytest.mark.parametrize("rope_heads", [1, 3])
def test_nope_and_rope_parts_match_the_joined_heads(rope_heads):
  """MLA's form: queries and keys as (nope, rope) parts, the rotary key shared by every head
  (rope_heads 1) or per head; outputs and all five gradients equal the reference's on the joined
  arrays (the shared key's gradient summed over heads)."""
  b, t, n, hn, hr, v = 2, 75, 3, 20, 8, 12
  ks = jax.random.split(jax.random.key(8), 6)
  q_nope, q_rope = jax.random.normal(ks[0], (b, t, n, hn)), jax.random.normal(ks[1], (b, t, n, hr))
  k_nope = jax.random.normal(ks[2], (b, t, n, hn))
  k_rope = jax.random.normal(ks[3], (b, t, rope_heads, hr))
  vv, cot = jax.random.normal(ks[4], (b, t, n, v)), jax.random.normal(ks[5], (b, t, n, v))
  seg = _segments(b, t, 2, seed=9)

  def out_and_grads(fn):
    out, vjp = jax.vjp(fn, q_nope, q_rope, k_nope, k_rope, vv)
    return out, vjp(cot)

  got = out_and_grads(lambda qn, qr, kn, kr, v: native.native_attention(
      (qn, qr), (kn, kr), v, seg, 0.3))
  want = out_and_grads(lambda qn, qr, kn, kr, v: reference_attention(
      join_heads((qn, qr), n), join_heads((kn, kr), n), v, seg, 0.3, True))
  assert got[1][3].shape == k_rope.shape
  np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-5)
  for name, a, w in zip(("dq_nope", "dq_rope", "dk_nope", "dk_rope", "dv"), got[1], want[1]):
    np.testing.assert_allclose(a, w, atol=1e-4, rtol=1e-5, err_msg=name)
