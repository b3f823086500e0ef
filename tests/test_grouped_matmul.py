"""Grouped matmul implementations against a per-group numpy reference, forward and gradients.

The Pallas kernel runs in interpret mode on CPU, with tiles that do not divide M, K or N, empty
groups (leading, inner, trailing) and rows past the last group. The native CPU kernel runs on
shapes that cross its tiles (rows per microkernel, depth panels, row and column blocks).
Tolerances (float32): outputs atol 1e-4, gradients atol 1e-3 (rtol 1e-5), as for the other paths.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import native_grouped_matmul as native
from kernels.backend import on_accelerator
from kernels.grouped_matmul import (blocked_grouped_matmul, blocked_swiglu, grouped_matmul,
                                    resolve_impl)
from kernels.grouped_matmul_pallas import pallas_grouped_matmul

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"no native kernel: {native.unavailable_reason()}")


def reference(lhs, rhs, sizes):
  out, start = [], 0
  for g, size in enumerate(np.asarray(sizes)):
    out.append(np.asarray(lhs)[start:start + size] @ np.asarray(rhs)[g])
    start += size
  return np.concatenate(out)


@pytest.mark.parametrize("sizes", [[5, 0, 17, 3], [0, 0, 25, 0], [64, 1, 0, 0], [7, 6, 6, 6]])
@pytest.mark.parametrize("impl", ["ragged", "blocked", "xla",
                                  pytest.param("native", marks=needs_native)])
def test_forward_matches_reference(sizes, impl):
  m = sum(sizes)
  lhs = jax.random.normal(jax.random.key(0), (m, 13))
  rhs = jax.random.normal(jax.random.key(1), (4, 13, 9))
  got = grouped_matmul(lhs, rhs, jnp.asarray(sizes), impl=impl)
  np.testing.assert_allclose(got, reference(lhs, rhs, sizes), atol=1e-4, rtol=1e-5)


def test_blocked_gradients_match_ragged():
  sizes = jnp.asarray([9, 0, 30, 2, 1])
  lhs = jax.random.normal(jax.random.key(2), (42, 16))
  rhs = jax.random.normal(jax.random.key(3), (5, 16, 11))
  loss = lambda fn: lambda l, r: (fn(l, r, sizes) ** 2).sum()
  ours = jax.grad(loss(lambda l, r, s: blocked_grouped_matmul(l, r, s, block=8)), (0, 1))(lhs, rhs)
  ref = jax.grad(loss(jax.lax.ragged_dot), (0, 1))(lhs, rhs)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5)


def test_blocked_swiglu_matches_three_ragged_products_with_gradients():
  """One block layout for gate, up and down == three ragged products; rows past the last group
  (3 here) give zeros and get zero gradient."""
  sizes = jnp.asarray([9, 0, 30, 2, 1])
  ks = jax.random.split(jax.random.key(7), 5)
  rows = jax.random.normal(ks[0], (45, 16))
  gate, up = jax.random.normal(ks[1], (5, 16, 12)), jax.random.normal(ks[2], (5, 16, 12))
  down, cot = jax.random.normal(ks[3], (5, 12, 16)), jax.random.normal(ks[4], (45, 16))

  def ragged(x, g, u, d, sizes):
    h = jax.nn.silu(jax.lax.ragged_dot(x, g, sizes)) * jax.lax.ragged_dot(x, u, sizes)
    return jax.lax.ragged_dot(h, d, sizes)

  def out_and_grads(fn):
    out, vjp = jax.vjp(lambda *a: fn(*a, sizes), rows, gate, up, down)
    return out, vjp(cot)

  (out, grads), (ref, ref_grads) = out_and_grads(
      lambda x, g, u, d, s: blocked_swiglu(x, s, g, u, d, block=8)), out_and_grads(ragged)
  assert np.all(np.asarray(out)[42:] == 0) and np.all(np.asarray(grads[0])[42:] == 0)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
  for name, a, b in zip(("rows", "gate", "up", "down"), grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("schedule,sizes,k,n,tiles", [
    ("owned", [5, 0, 17, 3], 13, 9, (16, 16, 16)),  # K, N below one tile; an inner empty group.
    ("owned", [0, 33, 0, 2, 0], 40, 20, (16, 16, 16)),  # Ragged K, N tiles; empty at both ends.
    ("revisit", [5, 0, 17, 3], 13, 9, (16, 16, 16)),
    ("revisit", [0, 33, 0, 2, 0], 40, 20, (16, 16, 16)),
])
def test_pallas_matches_ragged_dot_with_gradients(schedule, sizes, k, n, tiles):
  sizes = jnp.asarray(sizes)
  m = int(sizes.sum()) + 3  # Three rows past the last group: zeros out, zero gradient in.
  lhs = jax.random.normal(jax.random.key(4), (m, k))
  rhs = jax.random.normal(jax.random.key(5), (len(sizes), k, n))
  cotangent = jax.random.normal(jax.random.key(6), (m, n))

  def out_and_grads(fn):
    out, vjp = jax.vjp(lambda l, r: fn(l, r, sizes), lhs, rhs)
    return out, vjp(cotangent)

  kernel = lambda l, r, s: pallas_grouped_matmul(l, r, s, tiles, schedule, interpret=True)
  (out, grads), (ref_out, ref_grads) = jax.jit(lambda: out_and_grads(kernel))(), out_and_grads(
      jax.lax.ragged_dot)
  np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=1e-5)
  for name, a, b in zip(("dlhs", "drhs"), grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(grads[1][np.asarray(sizes) == 0], 0)


@pytest.mark.parametrize("impl", ["ragged", "blocked",
                                  pytest.param("native", marks=needs_native)])
def test_rows_past_the_last_group_are_zero(impl):
  sizes = jnp.asarray([4, 0, 3])
  lhs = jax.random.normal(jax.random.key(9), (12, 5))  # Five rows belong to no group.
  rhs = jax.random.normal(jax.random.key(10), (3, 5, 6))
  got, vjp = jax.vjp(lambda l: grouped_matmul(l, rhs, sizes, impl=impl), lhs)
  np.testing.assert_allclose(got[:7], reference(lhs[:7], rhs, sizes), atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(got[7:], 0)
  np.testing.assert_array_equal(vjp(jnp.ones_like(got))[0][7:], 0)


@needs_native
@pytest.mark.parametrize("sizes,k,n", [
    ([0, 200, 7, 0, 40], 300, 270),  # Rows over one row block, depth over one panel, cols over
    ([1, 0, 5], 3, 2),               # one column block; tiny groups, depth and width.
    ([300, 0, 3], 20, 70),  # d weights: a group's rows over one depth panel; its weights' 20
])                          # rows read in place (few rows per block), a ragged last sliver.
def test_native_matches_float64_reference_with_gradients(sizes, k, n):
  """Forward, d lhs and d weights against float64 numpy, per group; five rows past the last
  group: zero output, zero gradient; a group without rows: zero weight gradient."""
  m = sum(sizes) + 5
  ks = jax.random.split(jax.random.key(11), 3)
  lhs, rhs = jax.random.normal(ks[0], (m, k)), jax.random.normal(ks[1], (len(sizes), k, n))
  cot = jax.random.normal(ks[2], (m, n))
  out, vjp = jax.vjp(lambda l, r: native.native_grouped_matmul(l, r, jnp.asarray(sizes)), lhs, rhs)
  d_lhs, d_rhs = vjp(cot)
  l64, r64, c64 = (np.asarray(x, np.float64) for x in (lhs, rhs, cot))
  want_out, want_dl, want_dr = np.zeros((m, n)), np.zeros((m, k)), np.zeros(rhs.shape)
  start = 0
  for g, size in enumerate(sizes):
    rows = slice(start, start + size)
    want_out[rows] = l64[rows] @ r64[g]
    want_dl[rows] = c64[rows] @ r64[g].T
    want_dr[g] = l64[rows].T @ c64[rows]
    start += size
  tol = dict(atol=2e-4 * np.sqrt(max(k, n, m)), rtol=1e-5)
  np.testing.assert_allclose(out, want_out, **tol)
  np.testing.assert_allclose(d_lhs, want_dl, **tol)
  np.testing.assert_allclose(d_rhs, want_dr, **tol)
  np.testing.assert_array_equal(np.asarray(out)[m - 5:], 0)
  np.testing.assert_array_equal(np.asarray(d_lhs)[m - 5:], 0)
  np.testing.assert_array_equal(np.asarray(d_rhs)[np.asarray(sizes) == 0], 0)


@needs_native
def test_native_clips_negative_sizes_and_rows_past_m():
  """Sizes [-1, 5, 100] over 60 rows act as [0, 5, 55], like ragged_dot's clamping."""
  lhs = jax.random.normal(jax.random.key(14), (60, 7))
  rhs = jax.random.normal(jax.random.key(15), (3, 7, 40))
  cot = jax.random.normal(jax.random.key(16), (60, 40))
  got, vjp = jax.vjp(lambda l, r: native.native_grouped_matmul(l, r, jnp.asarray([-1, 5, 100])),
                     lhs, rhs)
  want, want_vjp = jax.vjp(lambda l, r: jax.lax.ragged_dot(l, r, jnp.asarray([0, 5, 55])),
                           lhs, rhs)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  for a, b in zip(vjp(cot), want_vjp(cot)):
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5)


@needs_native
def test_native_bfloat16_keeps_dtype_and_vmap_runs():
  sizes = jnp.asarray([3, 9])
  lhs = jax.random.normal(jax.random.key(12), (12, 20))
  rhs = jax.random.normal(jax.random.key(13), (2, 20, 17))
  got = native.native_grouped_matmul(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), sizes)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), reference(lhs, rhs, sizes),
                             atol=0.3, rtol=3e-2)
  batched = jax.vmap(lambda l: native.native_grouped_matmul(l, rhs, sizes))(jnp.stack([lhs, -lhs]))
  np.testing.assert_allclose(batched[1], -reference(lhs, rhs, sizes), atol=1e-4, rtol=1e-5)


@needs_native
def test_native_refuses_shapes_that_do_not_match_its_mode():
  sizes = jnp.asarray([2, 2])
  with pytest.raises(Exception, match="operand shapes do not match mode 0"):  # K 3 against 5.
    jax.block_until_ready(native._call(0, jnp.ones((4, 3)), jnp.ones((2, 5, 6)), sizes, (4, 6)))


@pytest.mark.skipif(on_accelerator(), reason="CPU resolution")
def test_auto_is_native_on_cpu_and_blocked_without_it(monkeypatch):
  assert resolve_impl("auto") == ("native" if native.available() else "blocked")
  assert resolve_impl("xla") == "blocked"  # XLA's own path: never the custom call.
  monkeypatch.setattr(native, "available", lambda: False)
  assert resolve_impl("auto") == "blocked"
  assert resolve_impl("auto", probe_native=False) == "native"  # Planning: nothing built.


def test_pallas_through_switch():
  sizes = jnp.asarray([3, 0, 14])
  lhs = jax.random.normal(jax.random.key(7), (17, 10))
  rhs = jax.random.normal(jax.random.key(8), (3, 10, 7))
  got = grouped_matmul(lhs, rhs, sizes, impl="pallas")
  np.testing.assert_allclose(got, reference(lhs, rhs, sizes), atol=1e-4, rtol=1e-5)


def test_bad_tiles():
  with pytest.raises(ValueError, match="powers of two >= 16"):
    pallas_grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), (16, 24, 16))
  with pytest.raises(ValueError, match="schedule must be one of"):
    pallas_grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), schedule="x")


def test_unknown_impl():
  with pytest.raises(ValueError, match="impl must be one of"):
    grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), impl="cuda")
