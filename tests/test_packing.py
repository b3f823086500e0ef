"""Packing padded rows for the forward (train/packing.py): the plan by hand, and packed log-probs,
gradients and routing replay against the unpacked forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.transformer import init_model
from train import packing
from train.loss import sequence_logprobs

from conftest import small_config


def test_plan_packs_first_fit_decreasing_by_hand():
  # Longest first: row 0 (5) opens packed row 0, row 2 (4) does not fit there and opens packed
  # row 1, row 1 (3) fills packed row 0, row 3 (2) joins packed row 1.
  plan = packing.plan_packing([5, 3, 4, 2], width=6, row_len=8)
  np.testing.assert_array_equal(plan["pack_source"], [
      [0, 1, 2, 3, 4, 6, 7, 8],
      [12, 13, 14, 15, 18, 19, -1, -1]])
  np.testing.assert_array_equal(plan["pack_segments"],
                                [[1] * 5 + [2] * 3, [1] * 4 + [2] * 2 + [0] * 2])
  np.testing.assert_array_equal(plan["pack_positions"], [[0, 1, 2, 3, 4, 0, 1, 2],
                                                         [0, 1, 2, 3, 0, 1, 0, 0]])
  np.testing.assert_array_equal(plan["pack_target"], [
      [0, 1, 2, 3, 4, -1], [5, 6, 7, -1, -1, -1], [8, 9, 10, 11, -1, -1], [12, 13, -1, -1, -1, -1]])


def test_plan_chunks_rounding_and_refusals():
  lengths = [3, 3, 3, 3, 6, 1, 1, 1]
  plan = packing.plan_packing(lengths, width=6, row_len=6, chunks=2, row_multiple=2)
  # Chunk 0 packs into 2 rows, chunk 1 into 2 ([6], [1, 1, 1]): 2 rows each, indices local.
  assert plan["pack_source"].shape == (4, 6)
  assert plan["pack_target"].max() < 2 * 6 and plan["pack_source"].max() < 4 * 6
  np.testing.assert_array_equal(plan["pack_source"][2], np.arange(6))  # Chunk 1's first row.
  # Rounded up to the row multiple: 4 rows per chunk of 4 no longer saves anything.
  assert packing.plan_packing(lengths, width=6, row_len=6, chunks=2, row_multiple=3) is not None
  assert packing.plan_packing(lengths, width=6, row_len=6, chunks=2, row_multiple=4) is None
  assert packing.plan_packing([6, 6], width=6, row_len=8) is None  # Nothing to gain.
  with pytest.raises(ValueError, match="row 1 has 9 tokens"):
    packing.plan_packing([2, 9], width=9, row_len=8)
  with pytest.raises(ValueError, match="do not split"):
    packing.plan_packing([1, 2, 3], width=6, row_len=8, chunks=2)
  assert packing.packed_row_len(83, 128) == 128 and packing.packed_row_len(83, 100) == 100
  assert packing.packed_row_len(83, 64) == 83  # Never below the padded width.


def test_pack_then_unpack_returns_the_real_tokens():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 10, 12)
  plan = packing.plan_packing(lengths, width=10, row_len=16, chunks=3)
  x = rng.normal(size=(12, 10)).astype(np.float32)
  got = np.zeros_like(x)
  for c in range(3):  # Each chunk's indices are its own.
    rows = slice(4 * c, 4 * c + 4)
    part = slice(c * len(plan["pack_source"]) // 3, (c + 1) * len(plan["pack_source"]) // 3)
    packed = packing.pack(jnp.asarray(x[rows]), plan["pack_source"][part])
    got[rows] = packing.unpack(packed, plan["pack_target"][rows])
  real = np.arange(10)[None, :] < lengths[:, None]
  np.testing.assert_array_equal(got, np.where(real, x, 0))


@pytest.fixture(scope="module")
def model():
  return init_model(small_config(max_seq_len=32), seed=1)


def _rows(seed, b=6, t=14):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, t + 1, b)
  tokens = np.where(np.arange(t) < lengths[:, None], rng.integers(1, 61, (b, t)), 0)
  mask = ((np.arange(t) >= 3) & (np.arange(t) < lengths[:, None])).astype(np.float32)
  return lengths, tokens.astype(np.int32), mask


@nnx.jit
def _logprobs_and_grads(model, tokens, mask, replay, plan):
  def total(m):
    per_token, _ = sequence_logprobs(m, tokens, mask, replay_BLTK=replay, packing=plan)
    return (per_token * jnp.arange(1.0, per_token.shape[1] + 1)).sum(), per_token
  (_, per_token), grads = nnx.value_and_grad(total, has_aux=True)(model)
  return per_token, grads


def _no_replay(model):
  """Recorded experts that all say "route as usual" (-1): the shapes of a replay, so both tests
  share the two compilations."""
  return np.full((6, model.cfg.num_moe_layers, 14, model.cfg.experts_per_token), -1, np.int32)


def test_packed_logprobs_and_gradients_equal_the_padded_forward(model):
  lengths, tokens, mask = _rows(0)
  plan = packing.plan_packing(lengths, width=14, row_len=24)
  assert plan is not None and plan["pack_source"].shape[0] < len(lengths)
  want, want_grads = _logprobs_and_grads(model, tokens, mask, _no_replay(model), None)
  got, got_grads = _logprobs_and_grads(model, tokens, mask, _no_replay(model), plan)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(np.asarray(want)).sum() > 1.0 and not np.any(np.asarray(got)[mask == 0])
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_packed_forward_replays_each_rows_experts(model):
  """Recorded experts travel with their tokens: replaying a routing other than the model's own
  moves the log-probs, identically packed and unpacked."""
  lengths, tokens, mask = _rows(0)
  plan = packing.plan_packing(lengths, width=14, row_len=24)
  layers, k = model.cfg.num_moe_layers, model.cfg.experts_per_token
  rng = np.random.default_rng(2)
  replay = np.stack([np.stack([rng.permutation(8)[:k] for _ in range(layers * 14)])
                     for _ in range(6)]).reshape(6, layers, 14, k).astype(np.int32)
  replay[:, :, 10:] = -1  # Route as usual from position 10 on.
  own, _ = _logprobs_and_grads(model, tokens, mask, _no_replay(model), None)
  want, _ = _logprobs_and_grads(model, tokens, mask, replay, None)
  got, _ = _logprobs_and_grads(model, tokens, mask, replay, plan)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(np.asarray(want) - np.asarray(own)).max() > 1e-3
