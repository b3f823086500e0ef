"""Grouped matmul implementations against a per-group numpy reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.grouped_matmul import blocked_grouped_matmul, grouped_matmul


def reference(lhs, rhs, sizes):
  out, start = [], 0
  for g, size in enumerate(np.asarray(sizes)):
    out.append(np.asarray(lhs)[start:start + size] @ np.asarray(rhs)[g])
    start += size
  return np.concatenate(out)


@pytest.mark.parametrize("sizes", [[5, 0, 17, 3], [0, 0, 25, 0], [64, 1, 0, 0], [7, 6, 6, 6]])
@pytest.mark.parametrize("impl", ["ragged", "blocked"])
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


def test_unknown_impl():
  with pytest.raises(ValueError, match="impl must be one of"):
    grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), impl="cuda")
