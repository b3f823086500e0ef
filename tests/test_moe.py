"""The MoE layer: dropless and capacity dispatch against a dense one-hot reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels import native_grouped_matmul
from model import moe, moe_dispatch, routing
from tests.conftest import small_config


def _weights(key, e=8, d=32, f=12):
  k1, k2, k3 = jax.random.split(key, 3)
  return (jax.random.normal(k1, (e, d, f)) * 0.3, jax.random.normal(k2, (e, d, f)) * 0.3,
          jax.random.normal(k3, (e, f, d)) * 0.3)


def dense_reference(x_TD, experts_TK, weights_TK, w_gate, w_up, w_down):
  """Every expert on every token, combined with a one-hot [T, E] weight matrix."""
  e = w_gate.shape[0]
  combine_TE = (jax.nn.one_hot(experts_TK, e) * weights_TK[..., None]).sum(1)
  h_TEF = jax.nn.silu(jnp.einsum("TD,EDF->TEF", x_TD, w_gate)) * jnp.einsum("TD,EDF->TEF", x_TD, w_up)
  return jnp.einsum("TEF,EFD,TE->TD", h_TEF, w_down, combine_TE)


def _routing(key, t=40, e=8, k=2):
  k1, k2 = jax.random.split(key)
  experts = jnp.argsort(jax.random.uniform(k1, (t, e)), axis=-1)[:, :k].astype(jnp.int32)
  return experts, jax.random.uniform(k2, (t, k))


# Every CPU grouped-matmul path (auto is "native" where the kernel builds, else "blocked").
CPU_IMPLS = ["blocked", "ragged", pytest.param("native", marks=pytest.mark.skipif(
    not native_grouped_matmul.available(), reason="the native grouped matmul did not build"))]


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_dropless_equals_dense_reference(impl):
  ws = _weights(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (40, 32))
  experts, weights = _routing(jax.random.key(2))
  got, dropped = moe.dropless_ffn(x, experts, weights, *ws, impl=impl)
  np.testing.assert_allclose(got, dense_reference(x, experts, weights, *ws), atol=1e-5, rtol=1e-5)
  assert int(dropped) == 0


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_dropless_gradients_equal_dense_reference(impl):
  ws = _weights(jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (24, 32))
  experts, weights = _routing(jax.random.key(5), t=24)
  loss = lambda fn: (lambda x, w, *ws: (fn(x, experts, w, *ws)[0] ** 2).sum())
  ffn = lambda *a: moe.dropless_ffn(*a, impl=impl)
  ours = jax.grad(loss(ffn), argnums=(0, 1, 2, 3, 4))(x, weights, *ws)
  ref_fn = lambda *a: (dense_reference(*a), None)
  ref = jax.grad(loss(ref_fn), argnums=(0, 1, 2, 3, 4))(x, weights, *ws)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_capacity_that_drops_nothing_equals_dropless():
  ws = _weights(jax.random.key(6))
  x = jax.random.normal(jax.random.key(7), (40, 32))
  experts, weights = _routing(jax.random.key(8))
  got, dropped = moe.capacity_ffn(x, experts, weights, *ws, slots=40)
  np.testing.assert_allclose(got, dense_reference(x, experts, weights, *ws), atol=1e-5, rtol=1e-5)
  assert int(dropped) == 0


def test_capacity_drops_the_late_assignments_and_counts_them():
  ws = _weights(jax.random.key(9))
  x = jax.random.normal(jax.random.key(10), (40, 32))
  experts, weights = _routing(jax.random.key(11))
  slots = 6
  # Reference: each expert keeps its first `slots` assignments in (token, slot) order.
  seen = np.zeros(8, int)
  keep = np.zeros(experts.shape, bool)
  for t, row in enumerate(np.asarray(experts)):
    for k, e in enumerate(row):
      keep[t, k] = seen[e] < slots
      seen[e] += 1
  expected = dense_reference(x, experts, jnp.where(keep, weights, 0.0), *ws)
  got, dropped = moe.capacity_ffn(x, experts, weights, *ws, slots=slots)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  assert int(dropped) == int((~keep).sum()) > 0


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_layer_equals_reference(capacity_factor):
  cfg = small_config(capacity_factor=capacity_factor)
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
  layer.router.bias[...] = jax.random.normal(jax.random.key(1), (8,)) * 0.05
  x = jax.random.normal(jax.random.key(2), (2, 10, 32))
  y, stats = layer(x)
  x_TD = x.reshape(20, 32)
  scores = routing.router_scores(x_TD @ layer.router.w[...], cfg)
  weights, experts = routing.select_experts(scores, layer.router.bias[...], cfg)
  slots = 20 if capacity_factor is None else moe.capacity(20, cfg)
  ref_routed, ref_dropped = moe.capacity_ffn(
      x_TD, experts, weights, layer.w_gate[...], layer.w_up[...], layer.w_down[...], slots)
  if capacity_factor is None:
    ref_routed = dense_reference(x_TD, experts, weights, layer.w_gate[...], layer.w_up[...],
                                 layer.w_down[...])
  expected = ref_routed.reshape(2, 10, 32) + layer.shared(x)
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
  assert int(stats.dropped) == int(ref_dropped)
  assert int(stats.tokens_per_expert.sum()) == 20 * cfg.experts_per_token
  np.testing.assert_array_equal(stats.tokens_per_expert, routing.tokens_per_expert(experts, 8))


def test_sort_assignments_by_expert_and_by_device():
  """The one dispatch: stable order, group sizes, ranks and capacity slots, by hand."""
  experts_TK = jnp.array([[3, 0], [1, 3], [0, 2]])  # Flattened: 3 0 1 3 0 2.
  d = moe_dispatch.sort_assignments(experts_TK, 4)
  np.testing.assert_array_equal(d.order, [1, 4, 2, 5, 0, 3])
  np.testing.assert_array_equal(d.position, [4, 0, 2, 5, 1, 3])  # The inverse of order.
  np.testing.assert_array_equal(d.token, [0, 2, 1, 2, 0, 1])
  np.testing.assert_array_equal(d.sizes, [2, 1, 1, 2])
  np.testing.assert_array_equal(d.rank, [0, 1, 0, 0, 0, 1])
  slot, kept = d.slots(1)  # One slot per expert: the second of experts 0 and 3 is dropped.
  np.testing.assert_array_equal(slot, [0, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(kept, [True, False, True, True, True, False])
  # Two devices holding experts {0, 1} and {2, 3}: groups are devices.
  by_device = moe_dispatch.sort_assignments(experts_TK, 2, experts_per_group=2)
  np.testing.assert_array_equal(by_device.group, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(by_device.sizes, [3, 3])
  np.testing.assert_array_equal(by_device.rank, [0, 1, 2, 0, 1, 2])
  # An expert past the last group (padding) sorts last and is counted nowhere.
  padded = moe_dispatch.sort_assignments(jnp.array([[2], [0], [1], [2]]), 2)
  np.testing.assert_array_equal(padded.sizes, [1, 1])
  np.testing.assert_array_equal(padded.order[:2], [1, 2])
  # Back in assignment order, weighted: token t gets sum_k w[t, k] * row(t, k).
  rows = jnp.arange(6.0)[:, None] * jnp.ones((1, 2))
  weights = jnp.array([[1.0, 10.0], [100.0, 0.0], [0.5, 2.0]])
  y = moe_dispatch.combine(rows, d, weights, jnp.float32)
  want = [[4 * 1 + 0 * 10], [2 * 100 + 5 * 0], [1 * 0.5 + 3 * 2]]  # Rows hold their sorted index.
  np.testing.assert_allclose(y, np.repeat(want, 2, axis=1))
  # Sorted rows of the tokens' features, and their gradient (through the inverse permutation)
  # equal to the plain gather's (a scatter-add); combine's gradient likewise.
  x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  np.testing.assert_array_equal(d.rows(x), x[d.token])
  cot = jnp.arange(12.0).reshape(6, 2) ** 1.5
  np.testing.assert_allclose(jax.grad(lambda x: (d.rows(x) * cot).sum())(x),
                             jax.grad(lambda x: (x[d.token] * cot).sum())(x), rtol=1e-6)
  scatter_unsort = lambda r: jnp.zeros_like(r).at[d.order].set(r).reshape(3, 2, 2)
  np.testing.assert_allclose(
      jax.grad(lambda r: (moe_dispatch.combine(r, d, weights, jnp.float32) ** 2).sum())(rows),
      jax.grad(lambda r: (jnp.einsum("TKD,TK->TD", scatter_unsort(r), weights) ** 2).sum())(rows),
      rtol=1e-6)
