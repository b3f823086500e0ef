"""Routing maths on hand-computed cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from model import routing
from tests.conftest import small_config

FOUR = dict(num_experts=4, num_expert_groups=2, topk_groups=1, experts_per_token=2,
            routed_scaling_factor=2.0)


def _select(scores, bias, **changes):
  cfg = small_config(**{**FOUR, **changes})
  w, e = routing.select_experts(jnp.asarray([scores], jnp.float32), jnp.asarray(bias, jnp.float32), cfg)
  order = np.argsort(np.asarray(e[0]))
  return np.asarray(e[0])[order], np.asarray(w[0])[order]


def test_group_score_is_sum_of_top_two():
  # Group 0 = {0.9, 0.1} sums to 1.0, group 1 = {0.6, 0.5} to 1.1: group 1 wins although
  # expert 0 is the single best (max-based grouping would keep group 0).
  experts, weights = _select([0.9, 0.1, 0.6, 0.5], [0, 0, 0, 0])
  np.testing.assert_array_equal(experts, [2, 3])
  np.testing.assert_allclose(weights, np.array([0.6, 0.5]) / 1.1 * 2.0, rtol=1e-6)


def test_bias_chooses_but_does_not_weigh():
  # The bias pushes expert 2 down: group sums become 1.0 vs 0.6, so group 0 is kept; the weights
  # come from the unbiased scores 0.9 and 0.1.
  experts, weights = _select([0.9, 0.1, 0.6, 0.5], [0, 0, -0.5, 0])
  np.testing.assert_array_equal(experts, [0, 1])
  np.testing.assert_allclose(weights, np.array([0.9, 0.1]) / 1.0 * 2.0, rtol=1e-6)


def test_without_grouping_and_without_renormalisation():
  experts, weights = _select([0.9, 0.1, 0.6, 0.5], [0, 0, 0, 0], num_expert_groups=1,
                             topk_groups=1, norm_topk_prob=False)
  np.testing.assert_array_equal(experts, [0, 2])
  np.testing.assert_allclose(weights, np.array([0.9, 0.6]) * 2.0, rtol=1e-6)


def test_v2_group_limited_greedy_uses_group_max():
  experts, weights = _select([0.4, 0.05, 0.3, 0.25], [0, 0, 0, 0], score_func="softmax",
                             topk_method="group_limited_greedy", norm_topk_prob=False)
  np.testing.assert_array_equal(experts, [0, 1])
  np.testing.assert_allclose(weights, np.array([0.4, 0.05]) * 2.0, rtol=1e-6)


def test_scores():
  cfg = small_config()
  logits = jnp.asarray([[0.0, np.log(3.0)]])
  np.testing.assert_allclose(routing.router_scores(logits, cfg), [[0.5, 0.75]], rtol=1e-6)
  soft = small_config(score_func="softmax", topk_method="greedy", norm_topk_prob=False)
  np.testing.assert_allclose(routing.router_scores(logits, soft), [[0.25, 0.75]], rtol=1e-6)


def test_tokens_per_expert():
  counts = routing.tokens_per_expert(jnp.asarray([[0, 3], [3, 1]]), 5)
  np.testing.assert_array_equal(counts, [1, 1, 0, 2, 0])


def test_sequence_balance_loss_hand_case():
  cfg = small_config()
  scores = jnp.asarray([[[0.8, 0.2], [0.6, 0.4]]])
  experts = jnp.asarray([[[0], [0]]])
  # f = [E/(K T) * 2, 0] = [2, 0]; P = [0.7, 0.3]; loss = 1.4.
  assert float(routing.sequence_balance_loss(scores, experts, cfg)) == pytest.approx(1.4)


def test_sequence_balance_loss_is_one_when_balanced():
  cfg = small_config()
  scores = jnp.full((3, 4, 4), 0.3)
  experts = jnp.asarray([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 3)
  assert float(routing.sequence_balance_loss(scores, experts, cfg)) == pytest.approx(1.0)
