"""PPO: GAE against its defining sum, the adaptive KL controller, the clipped policy and value
losses' zero gradient outside the trust region, and a resumable end-to-end run."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.grpo import GrpoConfig, token_losses
from posttrain.ppo import PpoConfig, adaptive_kl, gae, token_values, value_losses

RNG = np.random.default_rng(0)


def test_gae_is_the_discounted_sum_of_td_errors():
  rewards, values = RNG.normal(size=(3, 9)), RNG.normal(size=(3, 9))
  mask = np.zeros((3, 9))
  mask[0, 2:7], mask[1, 0:9], mask[2, 4:5] = 1, 1, 1
  mask[1, 3] = 0  # A masked-out observation inside an episode: its steps are skipped.
  gamma, lam = 0.9, 0.8
  adv, returns = gae(rewards, values, mask, gamma, lam)
  for b in range(3):
    steps = list(np.flatnonzero(mask[b]))
    nxt = {s: values[b, steps[i + 1]] if i + 1 < len(steps) else 0.0 for i, s in enumerate(steps)}
    delta = {s: rewards[b, s] + gamma * nxt[s] - values[b, s] for s in steps}
    for i, s in enumerate(steps):  # A_t = sum_l (gamma lam)^l delta_{t+l}.
      expected = sum((gamma * lam) ** l * delta[steps[i + l]] for l in range(len(steps) - i))
      assert adv[b, s] == pytest.approx(expected, rel=1e-12, abs=1e-12)
      assert returns[b, s] == pytest.approx(expected + values[b, s], rel=1e-12, abs=1e-12)
  assert (adv[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()
  # gamma = lam = 1: each advantage is the return to go minus the value.
  adv, _ = gae(rewards, values, mask, 1.0, 1.0)
  row = np.flatnonzero(mask[0])
  assert adv[0, row[0]] == pytest.approx(rewards[0, row].sum() - values[0, row[0]])


def test_adaptive_kl_controller_update():
  assert adaptive_kl(0.1, kl=9.0, target=6.0, horizon=10000, n=32) == pytest.approx(
      0.1 * (1 + 0.2 * 32 / 10000))  # The error is clipped to 0.2.
  assert adaptive_kl(0.1, kl=5.7, target=6.0, horizon=10000, n=32) == pytest.approx(
      0.1 * (1 - 0.05 * 32 / 10000))
  assert adaptive_kl(0.1, kl=0.0, target=6.0, horizon=100, n=100) == pytest.approx(0.08)
  with pytest.raises(ValueError, match="gamma and ppo.lam"):
    PpoConfig(lam=1.5)


def test_clipped_value_loss_has_no_gradient_outside_the_trust_region():
  old, returns, clip = jnp.zeros((1, 3)), jnp.ones((1, 3)), 0.2
  grad = jax.grad(lambda v: value_losses(v, old, returns, clip).sum())
  g = np.asarray(grad(jnp.asarray([[0.5, 0.1, -0.5]])))[0]
  assert g[0] == 0.0  # Moved past the clip towards the return: the clipped term rules, flat.
  assert g[1] == pytest.approx(0.1 - 1.0)  # Inside: the plain squared error.
  assert g[2] == pytest.approx(-0.5 - 1.0)  # Moved away from the return: never clipped.
  np.testing.assert_array_equal(token_values(jnp.asarray([[1.0, 2.0, 3.0]])), [[0.0, 1.0, 2.0]])


def test_per_token_advantages_and_the_policy_clip():
  cfg = GrpoConfig(eps_low=0.2, eps_high=0.2)
  old = jnp.zeros((1, 4))
  adv = jnp.asarray([[1.0, 1.0, -1.0, -1.0]])
  mask = jnp.ones((1, 4))
  grad = jax.grad(lambda lp: token_losses(cfg, lp, old, adv, mask)[0].sum())
  logp = jnp.log(jnp.asarray([[1.5, 1.1, 0.5, 0.9]]))  # Ratios.
  g = np.asarray(grad(logp))[0]
  assert g[0] == 0.0 and g[2] == 0.0  # Outside the trust region in the advantage's direction.
  assert g[1] == pytest.approx(-1.1) and g[3] == pytest.approx(0.9)  # -A * ratio.
  row = token_losses(cfg, logp, old, jnp.asarray([1.0]), mask)[0]
  per_token = token_losses(cfg, logp, old, jnp.ones((1, 4)), mask)[0]
  np.testing.assert_array_equal(row, per_token)


def test_ppo_loss_and_values_use_the_replayed_experts():
  from flax import nnx
  from conftest import small_config
  from model.transformer import forward, init_model
  from posttrain.heads import ScoredModel
  from posttrain.ppo import ppo_loss
  from train.loss import token_logprobs
  model = ScoredModel(init_model(small_config(num_layers=2, mtp_depth=0), 5))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, model.cfg.vocab_size)
  layers = model.cfg.num_moe_layers
  own = forward(model.trunk, tokens).router.experts[:layers]
  other = (own + 1) % model.cfg.num_experts  # Experts another routing chose: [L, B, T, K].
  call = nnx.jit(lambda m, t, r: m(t, replay_LBTK=r))
  scores, out = call(model, tokens, other)
  np.testing.assert_array_equal(out.router.experts[:layers], other)
  assert np.abs(np.asarray(scores - call(model, tokens, None)[0])).max() > 1e-4
  mask = jnp.ones((2, 9)).at[:, 0].set(0)
  old = token_logprobs(out.logits, tokens, mask)  # Rollout-time log-probs under `other`.
  batch = dict(tokens=tokens, completion_mask=mask, old_logprobs=old, sampler_logprobs=old,
               advantages=jnp.ones((2, 9)), returns=jnp.zeros((2, 9)),
               old_values=token_values(scores), replay_experts=jnp.swapaxes(other, 0, 1))
  loss = nnx.jit(lambda m, b: ppo_loss(PpoConfig(clip_eps=0.01, value_clip=0.01))(m, b, None, 0))
  rollout_logp = -float((old * mask).sum())
  sums = loss(model, batch)[2]["sums"]
  # Replayed: the rollout's log-probs and values, so no value is clipped.
  assert float(sums["entropy_proxy"]) == pytest.approx(rollout_logp, rel=1e-6)
  assert float(sums["value_clip_fraction"]) == 0
  del batch["replay_experts"]  # Routed again: other experts, other log-probs and values.
  sums = loss(model, batch)[2]["sums"]
  assert abs(float(sums["entropy_proxy"]) - rollout_logp) > 1e-3
  assert float(sums["value_clip_fraction"]) > 0


@pytest.mark.slow
def test_ppo_end_to_end_resumes_exactly_and_loads_as_a_policy(tmp_path, tiny_pretrain):
  from flax import nnx
  from configs.ppo import get_config
  from posttrain.lora import load_policy
  from posttrain.ppo import ppo
  from posttrain.heads import load_scored_model

  def config():
    c = get_config()
    c.init_from = tiny_pretrain
    c.total_steps, c.log_every, c.checkpoint_every, c.peak_flops = 4, 1, 2, 1e11
    c.data.problems = 20
    c.rollout.update(prompts=2, samples=2, max_new_tokens=6, epochs=1, minibatches=2)
    c.ppo.update(kl_target=0.01, kl_horizon=10.0)  # The controller moves visibly.
    c.rewards.format = 0.5
    return c
  run = str(tmp_path / "run")
  rows = ppo(config(), run)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  first, second = rows[0], rows[2]
  assert first["kl_coef"] == pytest.approx(0.05) and second["kl_coef"] != first["kl_coef"]
  for r in rows:
    assert np.isfinite(r["loss"]) and np.isfinite(r["value_loss"]) and r["value_loss"] >= 0
  full = jax.tree.leaves(nnx.state(load_scored_model(run, "value")))
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # As if killed before the last save.
  resumed = ppo(config(), run)
  assert [r["step"] for r in resumed] == [3, 4]
  for before, after in zip(rows[2:], resumed):
    keys = {"loss", "value_loss", "grad_norm"} | ({"reward", "kl_coef"} if "reward" in before
                                                   else set())
    assert {k: before[k] for k in keys} == {k: after[k] for k in keys}
  for x, y in zip(full, jax.tree.leaves(nnx.state(load_scored_model(run, "value")))):
    np.testing.assert_array_equal(x, y)
  with open(tmp_path / "run" / "run_config.json") as f:
    assert json.load(f)["scored_head"] == "value"
  policy = load_policy(run)  # Evaluation and later stages read the trunk.
  assert type(policy).__name__ == "Transformer" and policy.cfg.vocab_size > 320


def test_overoptimisation_plot_needs_proxy_and_gold(tmp_path):
  from posttrain.plots import overoptimisation_plot
  rows = [dict(step=s, reward_reward_model=0.1 * s, reward_accuracy=0.3 - 0.01 * s,
               kl_rollout=0.02 * s) for s in range(1, 6)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = overoptimisation_plot(str(tmp_path))
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(step=1, reward=0.5)) + "\n")
  assert overoptimisation_plot(str(tmp_path)) is None
