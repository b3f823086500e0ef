"""The shared loop's pieces: token-weighted accumulation, sequence_logprobs, init_from's config,
dropless generation under a capacity factor."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from model.generate import generate, pad_prompts
from model.sampling import SamplingConfig
from model.transformer import forward, init_model
from tests.conftest import small_config
from train import optimizer as opt
from train.loss import jitted_logprobs, sequence_logprobs
from train.step import StepConfig, create_train_state, make_train_step


def _ragged_batch(cfg, b=4, t=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  mask = np.zeros((b, t), np.float32)
  for i, n in enumerate([12, 2, 7, 0]):  # Very different token counts per row (and an empty one).
    mask[i, t - n:] = 1
  return dict(inputs=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
              segment_ids=jnp.ones((b, t), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
              loss_mask=jnp.asarray(mask))


def test_token_weighted_accumulation_with_ragged_masks_equals_the_whole_batch():
  cfg = small_config(num_layers=2, mtp_depth=0)
  tx = opt.make_optimizer(opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=0, total_steps=10))
  template, state = create_train_state(init_model(cfg, seed=0), tx)
  batch = _ragged_batch(cfg)
  metrics = {}
  for m in (1, 2, 4):
    step = jax.jit(make_train_step(template, tx, StepConfig(microbatches=m, balance_weight=0.0,
                                                            bias_gamma=0.0)))
    _, metrics[m] = step(state, batch)
  # The whole batch's token mean, computed directly.
  logits = forward(template.merge(state.params, state.extra), batch["inputs"]).logits
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  expected = float((ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
  for m in (1, 2, 4):
    np.testing.assert_allclose(metrics[m]["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics[m]["grad_norm"], metrics[1]["grad_norm"], rtol=1e-5)
    assert float(metrics[m]["tokens"]) == 21


def test_maxima_are_the_maximum_over_micro_batches():
  """A loss's aux["maxima"] come out of the step as their maximum over micro-batches."""
  cfg = small_config(num_layers=1, mtp_depth=0)
  tx = opt.make_optimizer(opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=0, total_steps=10))
  template, state = create_train_state(init_model(cfg, seed=0), tx)
  batch = _ragged_batch(cfg)

  def loss_fn(model, b, frozen, step):
    per_token, _ = sequence_logprobs(model, b["inputs"], b["loss_mask"])
    maxima = dict(largest_target=b["targets"].max().astype(jnp.float32),
                  lowest_first=-b["targets"][:, 0].min().astype(jnp.float32))
    return -per_token.sum(), b["loss_mask"].sum(), dict(sums=dict(loss=-per_token.sum()),
                                                        totals={}, maxima=maxima)

  step = jax.jit(make_train_step(template, tx, StepConfig(microbatches=2, balance_weight=0.0,
                                                          bias_gamma=0.0), loss_fn=loss_fn))
  metrics = step(state, batch)[1]
  halves = [float(batch["targets"][:2].max()), float(batch["targets"][2:].max())]
  assert halves[0] != halves[1]  # Each micro-batch has its own maximum; the larger is reported.
  assert float(metrics["largest_target"]) == max(halves)
  assert float(metrics["lowest_first"]) == -float(batch["targets"][:, 0].min())


def test_sequence_logprobs_against_a_direct_loop():
  cfg = small_config(num_layers=2)
  model = init_model(cfg, seed=3)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  mask = jnp.asarray([[1] * 9, [0] * 4 + [1] * 5], jnp.float32)
  per_token, total = jitted_logprobs(model, tokens, mask, temperature=0.7)
  # Each prefix followed by other, random tokens (one forward of 16 rows): causality and the
  # gather checked together.
  rng = np.random.default_rng(1)
  prefixes = [np.concatenate([tokens[b, :t], rng.integers(0, cfg.vocab_size, 9 - t)])
              for b in range(2) for t in range(1, 9)]
  logits = np.asarray(forward(model, jnp.asarray(np.stack(prefixes), jnp.int32)).logits,
                      np.float64) / 0.7
  for b in range(2):
    expected = []
    for t in range(1, 9):
      row = logits[8 * b + t - 1, t - 1]
      log_softmax = row - row.max() - np.log(np.exp(row - row.max()).sum())
      expected.append(log_softmax[int(tokens[b, t])] * float(mask[b, t]))
    np.testing.assert_allclose(per_token[b, 1:], expected, atol=1e-5)
    assert float(per_token[b, 0]) == 0
    np.testing.assert_allclose(total[b], sum(expected), atol=1e-4)


def test_init_from_applies_the_runs_dtype_and_names_differing_fields(tmp_path):
  pytest.importorskip("safetensors")
  from model import hf
  from train.loop import _initial_model
  cfg = small_config(mtp_depth=0)
  hf.save_pretrained(init_model(cfg, seed=1), str(tmp_path))
  c = ml_collections.ConfigDict(dict(init_from=str(tmp_path), seed=0))
  loaded = _initial_model(c, cfg.replace(dtype="bfloat16", remat_policy="full"))
  assert loaded.cfg.dtype == "bfloat16" and loaded.cfg.remat_policy == "full"
  assert loaded.embed.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"d_model: checkpoint 32, run 48.*num_heads: checkpoint 2, run 4"):
    _initial_model(c, cfg.replace(d_model=48, num_heads=4))


def test_generation_with_a_capacity_factor_equals_dropless():
  cfg = small_config(num_layers=2)
  dropless = init_model(cfg, seed=2)
  from model.transformer import with_config
  tight = with_config(dropless, cfg.replace(capacity_factor=0.25))  # Would drop most tokens.
  tokens, lengths = pad_prompts([[1, 5, 7, 9, 2], [3, 4]])
  assert int(forward(tight, tokens).router.dropped.sum()) > 0  # Training-path forward drops.
  sampling = SamplingConfig(max_new_tokens=6)
  a = generate(dropless, tokens, lengths, jax.random.key(0), sampling)
  b = generate(tight, tokens, lengths, jax.random.key(0), sampling)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
