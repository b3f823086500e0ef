"""Routing replay: the sampler records every token's experts per MoE layer; a training forward
given them routes exactly there, and in float32 reproduces the sampler's log-probs (1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import routing
from model.generate import generate, pad_prompts
from model.sampling import SamplingConfig
from model.transformer import forward, init_model
from tests.conftest import small_config
from train.loss import jitted_logprobs

PROMPTS = [[5, 9, 13, 2, 40, 7], [11, 3], [60, 1, 22, 8]]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=7)


@pytest.fixture(scope="module")
def model():
  return init_model(small_config(), 5)


def test_select_experts_replays_whole_tokens_only(cfg):
  scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (3, cfg.num_experts)))
  bias = jnp.zeros((cfg.num_experts,))
  weights, own = routing.select_experts(scores, bias, cfg)
  replay = jnp.asarray([[6, 7], [-1, 4], [0, 1]])
  w, used = routing.select_experts(scores, bias, cfg, replay)
  np.testing.assert_array_equal(used, [[6, 7], own[1], [0, 1]])  # Token 1 routes itself.
  picked = jnp.take_along_axis(scores, used, -1)  # Weights: this layer's scores there.
  expected = picked / picked.sum(-1, keepdims=True) * cfg.routed_scaling_factor
  np.testing.assert_allclose(w, expected if cfg.norm_topk_prob else picked
                             * cfg.routed_scaling_factor, rtol=1e-6)
  np.testing.assert_allclose(w[1], weights[1], rtol=1e-6)


def test_replaying_own_routing_changes_nothing_and_other_routing_is_used(model):
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, model.cfg.vocab_size)
  out = forward(model, tokens)
  layers = model.cfg.num_moe_layers
  own = out.router.experts[:layers]  # Main-model MoE layers (MTP blocks follow).
  same = forward(model, tokens, replay_LBTK=own)
  np.testing.assert_array_equal(same.logits, out.logits)
  unset = forward(model, tokens, replay_LBTK=jnp.full_like(own, -1))
  np.testing.assert_array_equal(unset.logits, out.logits)
  shifted = (own + 1) % model.cfg.num_experts  # Still distinct per token.
  other = forward(model, tokens, replay_LBTK=shifted)
  np.testing.assert_array_equal(other.router.experts[:layers], shifted)
  assert np.abs(np.asarray(other.logits - out.logits)).max() > 1e-4


def test_sampler_logprobs_are_reproduced_with_replay_after_routing_drifts(model):
  tokens_BT, lengths_B = pad_prompts(PROMPTS)
  out = generate(model, tokens_BT, lengths_B, jax.random.key(2), SAMPLING, record_experts=True)
  layers, b, width, k = out.experts.shape
  assert (layers, b, width, k) == (model.cfg.num_moe_layers, 3, 6 + SAMPLING.max_new_tokens, 2)
  rows = [p + out.tokens[i, :int(out.lengths[i])].tolist() for i, p in enumerate(PROMPTS)]
  full, _ = pad_prompts(rows, width=width)
  mask = np.zeros((b, width), np.float32)
  sampler = np.zeros((b, width), np.float32)
  for i, p in enumerate(PROMPTS):
    n = int(out.lengths[i])
    mask[i, len(p):len(p) + n] = 1
    sampler[i, len(p):len(p) + n] = out.logprobs[i, :n]
  record = np.asarray(out.experts)
  for i, p in enumerate(PROMPTS):  # Every fed token recorded; the last sampled one never fed.
    n = len(p) + int(out.lengths[i])
    assert (record[:, i, :n - 1] >= 0).all() and (record[:, i, n - 1:] == -1).all()
  replay_BLTK = np.swapaxes(record, 0, 1)
  # Same weights: the training forward routes as the sampler did, and matches its log-probs.
  train = forward(model, full).router.experts[:layers]
  fed = record >= 0
  np.testing.assert_array_equal(np.asarray(train)[fed], record[fed])
  logp, _ = jitted_logprobs(model, full, mask, 1.0, replay_BLTK)
  np.testing.assert_allclose(np.asarray(logp) * mask, sampler, atol=1e-5)

  # The router drifts (as after an update): routing again picks other experts and the log-probs
  # move; replay keeps the sampled experts, so only the gate weights' drift remains.
  drifted = init_model(small_config(), 5)  # The same weights, a separate copy.
  drifted.moe_layers.ffn.router.bias[...] = jax.random.normal(
      jax.random.key(3), drifted.moe_layers.ffn.router.bias.shape) * 0.5
  rerouted = np.asarray(forward(drifted, full).router.experts[:layers])
  assert (rerouted[fed] != record[fed]).any()
  replayed = forward(drifted, full, replay_LBTK=jnp.asarray(record))
  np.testing.assert_array_equal(np.asarray(replayed.router.experts[:layers])[fed], record[fed])
  # The bias chooses but never weighs: with replay, the drifted model's log-probs are the sampler's.
  logp, _ = jitted_logprobs(drifted, full, mask, 1.0, replay_BLTK)
  np.testing.assert_allclose(np.asarray(logp) * mask, sampler, atol=1e-5)
  no_replay, _ = jitted_logprobs(drifted, full, mask, 1.0)
  assert np.abs(np.asarray(no_replay) * mask - sampler).max() > 1e-3
