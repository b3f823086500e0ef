"""Speculative greedy decoding with the MTP module: the same tokens as plain greedy decoding (rows
of ragged prompts, stop tokens mid-way, both cache layouts), every draft kept when the draft is
certain to be right, and the requests it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.generate import generate, pad_prompts, speculative_greedy
from model.sampling import SamplingConfig
from model.transformer import init_model
from tests.conftest import small_config

N = 20


@pytest.fixture(scope="module")
def model():
  return init_model(small_config(), 0)


@pytest.fixture(scope="module")
def prompts():
  r = np.random.default_rng(0)
  return pad_prompts([list(r.integers(1, 61, size=int(n))) for n in (4, 2, 6, 1, 9, 3)])


@pytest.fixture(scope="module")
def sampling(model, prompts):
  """One config for every test (shared compilations) whose stop tokens end two rows mid-way:
  tokens only one row decodes, first at its step 3 or later (never 0, the zero-head token)."""
  plain = np.asarray(generate(model, *prompts, jax.random.key(0),
                              SamplingConfig(max_new_tokens=N)).tokens)
  stops = []
  for row in plain:
    for step, token in enumerate(row):
      if step >= 3 and token != 0 and (plain == token).any(axis=1).sum() == 1:
        stops.append(int(token))
        break
  return SamplingConfig(max_new_tokens=N, stop_tokens=tuple(stops[:2]), pad_token=0)


def _assert_same(plain, spec):
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  np.testing.assert_array_equal(spec.lengths, plain.lengths)
  np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-5)


@pytest.mark.parametrize("kind", ["latent", "expanded"])
def test_speculative_equals_plain_greedy(model, prompts, sampling, kind):
  tokens, lengths = prompts
  plain = generate(model, tokens, lengths, jax.random.key(0), sampling, cache_kind=kind)
  spec, stats = speculative_greedy(model, tokens, lengths, sampling, kind)
  _assert_same(plain, spec)
  assert int(plain.lengths.min()) < N and int(plain.lengths.max()) == N  # Stopped and not.
  # This random model's drafts are right now and then: both the kept and the rejected path ran.
  assert 0 < int(stats.accepted.sum()) < int(stats.steps.sum())
  # The prefill makes the first token, each step one more plus one per kept draft; the last
  # step's second token is dropped when it falls past N or follows a stop token.
  made = 1 + np.asarray(stats.steps + stats.accepted)
  assert np.all((made == spec.lengths) | (made == spec.lengths + 1)), made


def test_every_draft_is_kept_when_it_cannot_miss(prompts, sampling):
  """With a zero output head every logit ties and argmax is token 0 for the main model and the
  MTP module alike: every draft is confirmed, two tokens per step."""
  model = init_model(small_config(), 1)
  model.head.w.set_value(jnp.zeros_like(model.head.w[...]))
  tokens, lengths = prompts
  spec, stats = speculative_greedy(model, tokens, lengths, sampling)
  np.testing.assert_array_equal(spec.tokens, 0)
  np.testing.assert_array_equal(stats.accepted, stats.steps)
  np.testing.assert_array_equal(stats.steps, (N - 1 + 1) // 2)  # 1 from the prefill, 2 a step.
  _assert_same(generate(model, tokens, lengths, jax.random.key(0), sampling), spec)


def test_refused_requests(model, prompts, sampling):
  tokens, lengths = prompts
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="temperature must be 0"):
    generate(model, tokens, lengths, key, SamplingConfig(temperature=1.0, max_new_tokens=N),
             speculative=True)
  no_mtp = init_model(small_config(mtp_depth=0, num_layers=2), 0)
  with pytest.raises(ValueError, match="no MTP module"):
    generate(no_mtp, tokens, lengths, key, SamplingConfig(max_new_tokens=N), speculative=True)
  # Through `generate`, as rollouts and evaluation call it.
  _assert_same(generate(model, tokens, lengths, key, sampling),
               generate(model, tokens, lengths, key, sampling, speculative=True))
