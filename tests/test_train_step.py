"""The train step: loss falls, accumulation is exact, bias update, skipped non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.transformer import init_model
from tests.conftest import small_config
from train import optimizer as opt
from train.loss import mtp_targets
from train.step import StepConfig, create_train_state, make_train_step, router_bias_update


def _batch(cfg, b=4, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  segments = np.ones((b, t), np.int32)
  segments[:, t // 2:] = 2  # Two documents per row.
  positions = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
  return dict(inputs=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
              segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions, jnp.int32),
              loss_mask=jnp.ones((b, t), jnp.float32))


@pytest.fixture(scope="module")
def setup():
  """(cfg, fresh_state(), {microbatches: jitted step}): compiled once for the whole module."""
  cfg = small_config(num_layers=2)
  ocfg = opt.OptimizerConfig(peak_lr=1e-2, warmup_steps=2, total_steps=40)
  tx = opt.make_optimizer(ocfg)
  template, state = create_train_state(init_model(cfg, seed=0), tx, spike_window=8)
  initial = jax.tree.map(np.asarray, state)
  fresh = lambda: jax.tree.map(jnp.array, initial)
  steps = {m: jax.jit(make_train_step(template, tx, StepConfig(microbatches=m, spike_zscore=6.0, spike_window=8),
                                      opt.learning_rate(ocfg)), donate_argnums=0)
           for m in (1, 2)}
  return cfg, fresh, steps


def test_loss_falls_on_a_repeated_batch(setup):
  cfg, fresh, steps = setup
  state, step = fresh(), steps[1]
  batch = _batch(cfg)
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  assert int(state.step) == 25 and int(state.skipped) == 0
  assert float(metrics["expert_load_max_over_mean"]) >= 1.0
  assert np.isfinite(float(metrics["mtp_loss"])) and float(metrics["balance_loss"]) > 0


def test_gradient_accumulation_equals_full_batch(setup):
  cfg, fresh, steps = setup
  full_state, full_step = fresh(), steps[1]
  micro_state, micro_step = fresh(), steps[2]
  batch = _batch(cfg)
  for _ in range(2):
    full_state, full_metrics = full_step(full_state, batch)
    micro_state, micro_metrics = micro_step(micro_state, batch)
  np.testing.assert_allclose(full_metrics["loss"], micro_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(full_metrics["grad_norm"], micro_metrics["grad_norm"], rtol=1e-5)
  # Adam divides by sqrt(v): an element whose gradient is ~0 moves by up to lr (1e-2 here) with a
  # sign set by rounding, so parameters are compared to 1% of one step, gradients above exactly.
  for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(micro_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-4)
  for a, b in zip(jax.tree.leaves(full_state.extra), jax.tree.leaves(micro_state.extra)):
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_non_finite_step_is_skipped_and_counted(setup):
  cfg, fresh, steps = setup
  state, step = fresh(), steps[1]
  bad = jax.tree.map(lambda x: x, state.params)
  bad["head"]["w"] = bad["head"]["w"].at[0, 0].set(jnp.nan)
  state = state.replace(params=bad)
  before = jax.tree.map(np.asarray, (state.params, state.extra))
  state, metrics = step(state, _batch(cfg))
  assert int(metrics["skipped"]) == 1 and int(state.skipped) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.extra))):
    np.testing.assert_array_equal(a, b)


def test_router_bias_moves_towards_balance():
  extra = {"moe_layers": {"ffn": {"router": {"bias": jnp.zeros((2, 4))}}},
           "mtp": {0: {"block": {"ffn": {"router": {"bias": jnp.zeros((4,))}}}}}}
  load = jnp.asarray([[4, 0, 2, 2], [1, 1, 1, 1], [0, 8, 0, 0]])
  new = router_bias_update(extra, load, 0.001)
  np.testing.assert_allclose(new["moe_layers"]["ffn"]["router"]["bias"],
                             [[-0.001, 0.001, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(new["mtp"][0]["block"]["ffn"]["router"]["bias"],
                             [0.001, -0.001, 0.001, 0.001])
  # A forward without the MTP modules reports the main layers only: their biases move, the MTP
  # block's stays.
  main_only = router_bias_update(extra, load[:2], 0.001)
  np.testing.assert_allclose(main_only["moe_layers"]["ffn"]["router"]["bias"],
                             new["moe_layers"]["ffn"]["router"]["bias"])
  np.testing.assert_array_equal(main_only["mtp"][0]["block"]["ffn"]["router"]["bias"], 0.0)


def test_a_forward_without_mtp_keeps_the_logits_and_drops_the_mtp_outputs(cfg):
  from model.transformer import forward
  model = init_model(cfg, seed=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  full = forward(model, tokens)
  short = nnx.jit(lambda m, t: m(t, mtp=False))(model, tokens)
  np.testing.assert_array_equal(short.logits, full.logits)
  assert short.mtp_logits is None and full.mtp_logits.shape[0] == cfg.mtp_depth == 1
  layers = cfg.num_moe_layers
  assert short.router.tokens_per_expert.shape[0] == layers
  np.testing.assert_array_equal(short.router.tokens_per_expert,
                                full.router.tokens_per_expert[:layers])


def test_mtp_targets_stay_inside_documents():
  targets = jnp.asarray([[1, 2, 3, 4, 5]])
  segments = jnp.asarray([[1, 1, 1, 2, 2]])
  shifted, weights = mtp_targets(targets, segments, jnp.ones((1, 5)), depth=1)
  np.testing.assert_array_equal(shifted, [[2, 3, 4, 5, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0]])


def test_decay_mask_and_schedules():
  cfg = small_config()
  from flax import nnx
  params = nnx.to_pure_dict(nnx.state(init_model(cfg), nnx.Param))
  mask = opt.decay_mask(params)
  assert mask["dense_layers"]["attn_norm"]["scale"] is False
  assert mask["moe_layers"]["ffn"]["w_gate"] is True
  assert mask["final_norm"]["scale"] is False and mask["embed"]["embedding"] is True
  wsd = opt.learning_rate(opt.OptimizerConfig(peak_lr=1.0, warmup_steps=10, total_steps=100,
                                              schedule="wsd", decay_fraction=0.2))
  assert float(wsd(5)) == pytest.approx(0.5)
  assert float(wsd(50)) == pytest.approx(1.0)
  assert float(wsd(100)) == pytest.approx(0.1)
  cosine = opt.learning_rate(opt.OptimizerConfig(peak_lr=1.0, warmup_steps=10, total_steps=100))
  assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(100)) == pytest.approx(0.1)


def test_loss_spike_is_skipped(setup):
  cfg, fresh, steps = setup
  state = fresh()
  # A window of recent losses near 1.0: the fresh model's loss (about ln 61 = 4.1) is a spike.
  window = (1.0 + 0.01 * np.arange(8)).astype(np.float32)
  state = state.replace(loss_window=jnp.asarray(window), window_count=jnp.asarray(8, jnp.int32))
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = steps[1](state, _batch(cfg))
  assert bool(metrics["loss_spike"]) and int(metrics["bad_streak"]) == 1 and int(state.skipped) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(state.loss_window, window)  # Rejected losses stay out.


def test_step_schedules():
  from train.step import bias_gamma_at, mtp_weight_at
  cfg = StepConfig(mtp_weight=0.3, mtp_weight_final=0.1, mtp_switch_step=10, bias_gamma=1e-3,
                   bias_gamma_stop_step=20)
  assert float(mtp_weight_at(cfg, 9)) == pytest.approx(0.3)
  assert float(mtp_weight_at(cfg, 10)) == pytest.approx(0.1)
  assert float(bias_gamma_at(cfg, 19)) == pytest.approx(1e-3) and float(bias_gamma_at(cfg, 20)) == 0
  assert float(mtp_weight_at(StepConfig(), 10**6)) == pytest.approx(0.3)  # 0: never switch.
