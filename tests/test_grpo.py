"""GRPO family: advantages, surrogates, KL and aggregation against direct float64 loops; the
rollout batch source (masks, sampler/trainer agreement, dynamic sampling, exact resume); the
reward set's errors; one end-to-end run that resumes exactly."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain import chat
from posttrain.grpo import GrpoConfig, aggregate, grpo_loss, kl_per_token, token_losses
from posttrain.rewards import (RewardSet, length_penalty, step_accuracy, step_credits,
                               think_format)
from posttrain.rl import RolloutBatches, RolloutConfig, group_advantages, process_advantages
from train.packing import KEYS as packing_keys, PackLayout

RNG = np.random.default_rng(0)


def test_group_advantages_match_direct_loops():
  r = RNG.integers(0, 2, (5, 6)).astype(float) + RNG.normal(0, 0.1, (5, 6))
  grpo, dr, rloo = (group_advantages(r, k, eps=1e-4) for k in ("grpo", "dr_grpo", "rloo"))
  for i in range(5):
    mean = sum(r[i]) / 6
    std = (sum((x - mean) ** 2 for x in r[i]) / 5) ** 0.5
    for j in range(6):
      assert grpo[i, j] == pytest.approx((r[i, j] - mean) / (std + 1e-4), rel=1e-12)
      assert dr[i, j] == pytest.approx(r[i, j] - mean, abs=1e-12)
      others = [r[i, k] for k in range(6) if k != j]
      assert rloo[i, j] == pytest.approx(r[i, j] - sum(others) / 5, abs=1e-12)
  assert np.all(group_advantages(np.ones((2, 4)), "grpo") == 0)
  with_nan = r.copy()
  with_nan[0, 0] = np.nan  # Left out of its group's statistics, advantage 0.
  for kind in ("grpo", "dr_grpo", "rloo"):
    got = group_advantages(with_nan, kind)
    assert got[0, 0] == 0
    np.testing.assert_allclose(got[0, 1:], group_advantages(r[:1, 1:], kind)[0], rtol=1e-12)
    np.testing.assert_allclose(got[1:], group_advantages(r[1:], kind), rtol=1e-12)


def _direct_token_loss(cfg, logp, old, adv):
  """Per-token surrogate, written out per scalar (float64)."""
  out = np.zeros_like(logp, dtype=np.float64)
  for b in range(logp.shape[0]):
    for t in range(logp.shape[1]):
      ratio = np.exp(logp[b, t] - old[b, t])
      a = adv[b]
      if cfg.surrogate == "cispo":
        out[b, t] = -min(ratio, 1 + cfg.eps_high) * a * logp[b, t]
        continue
      clipped = min(max(ratio, 1 - cfg.eps_low), 1 + cfg.eps_high)
      loss = -min(ratio * a, clipped * a)
      if cfg.dual_clip and a < 0:
        loss = min(loss, -cfg.dual_clip * a)
      out[b, t] = loss
  return out


@pytest.mark.parametrize("cfg", [GrpoConfig(), GrpoConfig(eps_high=0.28, dual_clip=3.0),
                                 GrpoConfig(surrogate="cispo", eps_high=0.5)])
def test_token_losses_match_a_direct_loop(cfg):
  logp = RNG.normal(-2, 0.5, (4, 7))
  old = logp + RNG.normal(0, 0.4, (4, 7))
  adv = np.array([1.5, -0.7, -2.0, 0.3])
  mask = np.ones((4, 7))
  got, clip = token_losses(cfg, jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                           jnp.asarray(adv, jnp.float32), jnp.asarray(mask))
  np.testing.assert_allclose(got, _direct_token_loss(cfg, logp, old, adv), rtol=1e-5, atol=1e-6)
  assert 0 < float(clip["clip_fraction"]) < 1
  ratio, a = np.exp(logp - old), adv[:, None] * np.ones((1, 7))
  if cfg.surrogate == "clip":  # Low: a < 0 and ratio < 1 - eps_low; high: a > 0, ratio > 1 + eps.
    low = ((a < 0) & (ratio < 1 - cfg.eps_low)).mean()
    high = ((a > 0) & (ratio > 1 + cfg.eps_high)).mean()
  else:  # CISPO clips the IS weight from above only.
    low, high = 0.0, (ratio > 1 + cfg.eps_high).mean()
  np.testing.assert_allclose([clip["clip_low"], clip["clip_high"]], [low, high], atol=1e-6)
  np.testing.assert_allclose(clip["clip_fraction"], low + high, atol=1e-6)


def test_on_policy_gradient_is_the_policy_gradient():
  """With old == logp the clipped loss's gradient is -A d logp (tokens masked out give none)."""
  logp = jnp.asarray(RNG.normal(-1, 0.3, (3, 5)), jnp.float32)
  adv = jnp.asarray([1.0, -2.0, 0.5], jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], jnp.float32)
  for cfg in (GrpoConfig(), GrpoConfig(surrogate="cispo")):
    grad = jax.grad(lambda lp: token_losses(cfg, lp, jax.lax.stop_gradient(lp), adv, mask)[0].sum())(logp)
    np.testing.assert_allclose(grad, -adv[:, None] * mask, rtol=1e-6)


def test_sequence_ratio_is_the_length_normalised_ratio():
  cfg = GrpoConfig(ratio="sequence", eps_low=10.0, eps_high=10.0)
  logp = RNG.normal(-1, 0.3, (2, 4))
  old = logp + RNG.normal(0, 0.2, (2, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float64)
  got, _ = token_losses(cfg, jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                        jnp.ones(2), jnp.asarray(mask))
  for b in range(2):
    n = mask[b].sum()
    ratio = np.exp(sum((logp[b, t] - old[b, t]) for t in range(4) if mask[b, t]) / n)
    np.testing.assert_allclose(np.asarray(got[b])[mask[b] > 0], -ratio, rtol=1e-5)


def test_kl_estimators_and_aggregations():
  logp = RNG.normal(-1, 0.3, (3, 4))
  ref = logp + RNG.normal(0, 0.3, (3, 4))
  k3 = np.asarray(kl_per_token("k3", jnp.asarray(logp), jnp.asarray(ref)))
  np.testing.assert_allclose(k3, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-4, atol=1e-6)
  assert np.all(k3 >= 0)
  np.testing.assert_allclose(kl_per_token("k1", jnp.asarray(logp), jnp.asarray(ref)), logp - ref,
                             rtol=1e-5)
  x = RNG.normal(0, 1, (3, 4))
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float64)
  xm = x * mask
  s, w = aggregate("sequence_mean", jnp.asarray(xm), jnp.asarray(mask), 10)
  assert float(s / w) == pytest.approx((xm[0].sum() / 2 + xm[1].sum() / 4) / 2, rel=1e-5)
  s, w = aggregate("token_mean", jnp.asarray(xm), jnp.asarray(mask), 10)
  assert float(s / w) == pytest.approx(xm.sum() / 6, rel=1e-5)
  s, w = aggregate("constant", jnp.asarray(xm), jnp.asarray(mask), 10)
  assert float(s / w) == pytest.approx(xm.sum() / 10 / 2, rel=1e-5)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="grpo.aggregation"):
    GrpoConfig(aggregation="mean")
  with pytest.raises(ValueError, match="dual_clip"):
    GrpoConfig(dual_clip=0.5)
  with pytest.raises(ValueError, match="minibatches 3 must divide"):
    RolloutConfig(prompts=2, samples=4, minibatches=3)
  with pytest.raises(ValueError, match="rollout.old_logprobs must be one of"):
    RolloutConfig(old_logprobs="reference")


def test_sampler_old_logprobs_conflicts_are_named_before_loading_a_model():
  from configs.grpo import get_config as grpo_config
  from configs.ppo import get_config as ppo_config
  from posttrain.grpo import grpo_stage
  from posttrain.ppo import ppo_stage
  g = grpo_config()
  g.rollout.old_logprobs, g.grpo.tis_cap = "sampler", 2.0
  with pytest.raises(ValueError, match="grpo.tis_cap .* rollout.old_logprobs='sampler'"):
    grpo_stage(g, "/nonexistent")
  p = ppo_config()
  p.rollout.old_logprobs = "sampler"
  with pytest.raises(ValueError, match="PPO.*rollout.old_logprobs must be 'forward'"):
    ppo_stage(p, "/nonexistent")


def test_reward_set_combines_and_rejects_bad_rewards():
  completions = ["<think>a</think>5", "5", "<think>b</think>"]
  rs = RewardSet({"format": think_format, "len": length_penalty(10, 4)}, {"format": 2.0, "len": 1.0})
  total, parts = rs(["p"] * 3, completions, lengths=[3, 8, 12])
  np.testing.assert_allclose(parts["format"], [1, 0, 0])
  np.testing.assert_allclose(parts["len"], [0, -0.5, -1])
  np.testing.assert_allclose(total, [2, -0.5, -1])
  with pytest.raises(ValueError, match="returned 1 values for 3"):
    RewardSet({"short": lambda p, c, **f: [1.0]}, {"short": 1.0})(["p"] * 3, completions)
  # A reward that raises scores its batch NaN and is counted per rollout (pop_errors); raising
  # in three rollouts in a row stops the run. A reward of weight 0 is logged, never in the total.
  calls = iter([True, False, True, True, True, True])
  flaky = lambda p, c, **f: [1 / 0] if next(calls) else [1.0] * len(c)
  boom = RewardSet({"boom": flaky, "format": think_format, "logged": flaky},
                   {"boom": 1.0, "format": 1.0, "logged": 0.0})
  total, parts = boom(["p"] * 3, completions)  # boom raises, logged does not.
  assert np.isnan(total).all() and np.isnan(parts["boom"]).all()
  np.testing.assert_allclose(parts["format"], [1, 0, 0])
  assert boom.pop_errors() == {"reward_boom_errors": 1.0, "reward_format_errors": 0.0,
                               "reward_logged_errors": 0.0}
  total, parts = boom(["p"] * 3, completions)  # boom raises, then logged raises: rollout 2.
  assert np.isnan(parts["logged"]).all() and np.isnan(total).all()
  boom.pop_errors()
  calls = iter([False, True])  # Rollout 3: only the logged reward raises.
  total, parts = boom(["p"] * 3, completions)
  np.testing.assert_allclose(total, [2, 1, 1])  # Its NaN does not void the total.
  boom.pop_errors()
  calls = iter([True, False] * 4)  # boom raises in rollouts 4 (twice: a refill), 5 and 6.
  for _ in range(2):
    boom(["p"] * 3, completions)
  assert boom.pop_errors()["reward_boom_errors"] == 2.0
  boom(["p"] * 3, completions)
  boom.pop_errors()
  boom(["p"] * 3, completions)
  with pytest.raises(RuntimeError, match="reward 'boom' raised in 3 rollouts in a row; the last "
                                         "error: ZeroDivisionError"):
    boom.pop_errors()
  with pytest.raises(TypeError, match="fn\\(prompts, completions"):
    RewardSet({"bad": lambda completions: []}, {"bad": 1.0})
  with pytest.raises(ValueError, match="no weight"):
    RewardSet({"format": think_format}, {})


def test_step_accuracy_credits_the_problems_own_steps_done_right():
  from posttrain.tasks import get_task
  task = get_task("arithmetic")
  problems = task.problems("train", 20)
  steps = step_accuracy({"arithmetic": task})
  assert steps([""] * 20, [p.solution for p in problems], problems=problems) == [1.0] * 20
  p = task.make(5, [("-", 2), ("*", 3)])  # (5 - 2) * 3: steps 5 - 2 = 3, 3 * 3 = 9.
  completions = [
      "<think>Step 1: 5 - 2 = 4. Step 2: 4 * 3 = 12.</think>12",  # Wrong first: nothing after.
      "<think>Step 1: 5 - 2 = 3. Step 2: 3 * 3 = 10.</think>10",  # Right, then wrong.
      "<think>Step 1: 5 - 5 = 0. Step 2: 0 * 3 = 0.</think>0",  # True, but not the problem's.
      "<think>Step 1: 5 - 2 = 3.</think>3",  # One of two steps.
      "<think>Step 1: 5 - 2 = 3. Step 2: 2 * 3 = 6.</think>6",  # Step 2 not on step 1's result.
      "Step 1: 5 - 2 = 3. Step 2: 3 * 3 = 9. So 9",  # Malformed, steps all right: 1.
      "(5 - 2) * 3 = 9"]  # Not a step (a op b = c), so no credit: 0.
  np.testing.assert_allclose(steps([""] * 7, completions, problems=[p] * 7),
                             [0.0, 0.5, 0.0, 0.5, 0.5, 1.0, 0.0])
  with pytest.raises(ValueError, match=r"\['program'\] have no step checks"):
    programs = get_task("program").problems("train", 1)
    step_accuracy({"program": get_task("program")})([""], ["x"], problems=programs)
  from configs.grpo import get_config
  from posttrain.grpo import rl_batches
  c = get_config()
  c.data.problems, c.data.tasks, c.rewards.steps = 4, "arithmetic,program", 1.0
  with pytest.raises(ValueError, match=r"the task families \['program'\] cannot"):
    rl_batches(c, RolloutConfig(), None, None)  # Refused before anything is built.


def _check_step_credits(task, p, cases):
  """Each case's credits, where each ends (its text, None: the completion's end), and their sum
  as the step score."""
  for completion, (texts, want) in cases.items():
    credit = task.step_credit(p, completion)
    assert [c for _, c in credit] == pytest.approx(want), completion
    for (end, _), text in zip(credit, texts):
      assert end == len(completion) if text is None else completion[:end].endswith(text)
    assert sum(want) == pytest.approx(task.step_score(p, completion))


def test_step_credit_places_each_steps_share_where_the_step_ends():
  from posttrain.tasks import get_task
  task = get_task("arithmetic")
  p = task.make(5, [("-", 2), ("*", 3)])  # (5 - 2) * 3: steps 5 - 2 = 3, 3 * 3 = 9.
  cases = {  # completion: the text each step's credit ends on (None: the end), and the credits.
      "<think>Step 1: 5 - 2 = 3. Step 2: 3 * 3 = 9.</think>9":
          (["5 - 2 = 3", "3 * 3 = 9"], [0.5, 0.5]),
      "<think>Step 1: 5 - 2 = 3. Step 2: 3 * 3 = 10.</think>10":
          (["5 - 2 = 3", "3 * 3 = 10"], [0.5, 0.0]),
      "<think>Step 1: 5 - 2 = 4. Step 2: 4 * 3 = 12.</think>12":
          (["5 - 2 = 4", "4 * 3 = 12"], [0.0, 0.0]),  # Nothing after the first mistake.
      "<think>Step 1: 5 - 2 = 3.</think>3 * 3 = 9": (["5 - 2 = 3", None], [0.5, 0.0]),
      "Step 1: 5 - 2 = 3. Step 2: 3 * 3 = 9. So 9": (["5 - 2 = 3", "3 * 3 = 9"], [0.5, 0.5]),
      "(5 - 2) * 3 = 9": ([None, None], [0.0, 0.0])}
  _check_step_credits(task, p, cases)
  problems = task.problems("train", 30)
  solutions = [p.solution for p in problems]
  scaled = step_credits({"arithmetic": task}, 2.0)(problems, solutions)
  assert [sum(r for _, r in row) for row in scaled] == pytest.approx([2.0] * 30)
  with pytest.raises(ValueError, match=r"\['program'\] have no step checks"):
    step_credits({"program": get_task("program")}, 1.0)


def test_countdown_step_credit_counts_legal_moves_before_the_first_illegal_one():
  from posttrain.tasks import get_task
  task = get_task("countdown")
  p = task.make([3, 5, 2, 4], ["+", "*", "-"])  # ((3 + 5) * 2) - 4 = 12: three combinations.
  third = 1 / 3
  cases = {  # completion: the text each step's credit ends on (None: the end), and the credits.
      p.solution: (["3 + 5 = 8", "8 * 2 = 16", "16 - 4 = 12"], [third] * 3),
      # Legal moves that miss the target still earn their credit (accuracy says it missed).
      "<think>3 + 5 = 8. 2 + 4 = 6. 8 * 6 = 48.</think>(3 + 5) * (2 + 4)":
          (["3 + 5 = 8", "2 + 4 = 6", "8 * 6 = 48"], [third] * 3),
      "<think>3 + 5 = 8. 8 * 5 = 40. 40 - 4 = 36.</think>x":  # 5 used twice: nothing after.
          (["3 + 5 = 8", "8 * 5 = 40", "40 - 4 = 36"], [third, 0.0, 0.0]),
      "<think>3 + 5 = 9. 9 * 2 = 18. 18 - 4 = 14.</think>x":  # False first step.
          (["3 + 5 = 9", "9 * 2 = 18", "18 - 4 = 14"], [0.0, 0.0, 0.0]),
      "<think>4 * 4 = 16. 16 - 3 = 13.</think>x": (["4 * 4 = 16", "16 - 3 = 13", None],
                                                  [0.0, 0.0, 0.0]),  # One 4 given.
      "<think>3 + 5 = 8. 8 - 8 = 0.</think>x":  # The 8 made once is used up by itself.
          (["3 + 5 = 8", "8 - 8 = 0", None], [third, 0.0, 0.0]),
      "<think>5 - 3 = 2. 2 * 2 = 4. 4 * 4 = 16.</think>x":  # A result and a given number alike.
          (["5 - 3 = 2", "2 * 2 = 4", "4 * 4 = 16"], [third] * 3),
      "3 + 5 = 8. 8 * 2 = 16. So 16": (["3 + 5 = 8", "8 * 2 = 16", None], [third, third, 0.0]),
      "<think>3 + 5 = 9. 2 * 4 = 8. 9 - 8 = 1.</think>x":  # Legal after an illegal one: nothing.
          (["3 + 5 = 9", "2 * 4 = 8", "9 - 8 = 1"], [0.0, 0.0, 0.0]),
      "<think>3 + 5 = 8. 8 * 2 = 16. 8 - 4 = 4.</think>x":  # The 8 was used up by step 2.
          (["3 + 5 = 8", "8 * 2 = 16", "8 - 4 = 4"], [third, third, 0.0]),
      "<think>3 + 5 = 8. 8 * 2 = 16. 16 - 4 = 12. 12 - 12 = 0.</think>12":  # Past the three.
          (["3 + 5 = 8", "8 * 2 = 16", "16 - 4 = 12"], [third] * 3)}
  _check_step_credits(task, p, cases)
  p = task.make([3, 7, 2], ["-", "*"])  # (3 - 7) * 2 = -8: a negative value at hand.
  _check_step_credits(task, p, {
      p.solution: (["3 - 7 = -4", "-4 * 2 = -8"], [0.5, 0.5]),
      "<think>3 - 7 = -4. -4 / 2 = -2.</think>x": (["3 - 7 = -4", None], [0.5, 0.0])})  # "/" unread.
  problems = task.problems("train", 30)
  scaled = step_credits({"countdown": task}, 2.0)(problems, [q.solution for q in problems])
  assert [sum(r for _, r in row) for row in scaled] == pytest.approx([2.0] * 30)


def test_process_advantages_match_a_direct_loop_and_a_hand_computation():
  events = [[(3, 0.5), (5, 0.5), (5, 1.0)], [(2, 0.0), (4, 0.0), (4, 0.0)],  # Group 1.
            [(1, 0.2), (6, 0.3)], None, [(2, 0.7), (3, 0.0)]]  # Group 2, row 3 not finite.
  with pytest.raises(ValueError, match="not groups of 2"):
    process_advantages(events, 2, 7)
  events.append([(0, 1.0), (6, 0.0)])
  got = process_advantages(events, 3, 7, eps=1e-4)
  want = np.zeros((6, 7))
  for first in (0, 3):
    values = [r for row in events[first:first + 3] if row for _, r in row]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    for row in range(first, first + 3):
      for t in range(7):
        want[row, t] = sum((r - mean) / (std + 1e-4) for col, r in events[row] or () if col >= t)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  assert np.all(got[3] == 0)
  # By hand, rows 0 and 1 as one group: mean 1/3, std 1/sqrt(6); normalised, 0.5 -> u, 1 -> 4u
  # and 0 -> -2u with u = (1/6) / (1/sqrt(6) + eps).
  hand = process_advantages(events[:2], 2, 7, eps=1e-4)
  u = (1 / 6) / (1 / 6 ** 0.5 + 1e-4)
  np.testing.assert_allclose(hand[0], [6 * u] * 4 + [5 * u] * 2 + [0], rtol=1e-12)
  np.testing.assert_allclose(hand[1], [-6 * u] * 3 + [-4 * u] * 2 + [0] * 2, rtol=1e-12)


def test_process_rollouts_put_each_steps_credit_on_the_token_that_ends_it(chat_tok):
  from posttrain.tasks import get_task
  task = get_task("arithmetic")
  p = task.make(5, [("-", 2), ("*", 3)])
  rewards = RewardSet({"accuracy": lambda prompts, completions, problems, **f: [
      task.verify(q, c).score for q, c in zip(problems, completions)],
      "steps": step_accuracy({"arithmetic": task})}, {"accuracy": 1.0, "steps": 2.0})
  make = lambda advantage, credit: RolloutBatches([p], chat_tok, rewards, RolloutConfig(
      prompts=1, samples=2), advantage, step_credit=credit)
  with pytest.raises(ValueError, match="needs step credits"):
    make("process", None)
  source = make("process", step_credits({"arithmetic": task}, 2.0))
  texts = ["<think>Step 1: 5 - 2 = 3. Step 2: 3 * 3 = 10.</think>10",
           "<think>Step 1: 5 - 2 = 3. Step 2: 3 * 3 = 9.</think>9"]
  ids = [chat.encode_text(chat_tok, t) for t in texts]
  total, _ = rewards([""] * 2, texts, problems=[p] * 2)
  np.testing.assert_allclose(total, [1.0, 3.0])
  events = source._reward_events([p] * 2, texts, ids, np.array([total[0], np.nan]))
  assert events[1] is None
  (first, r1), (second, r2), (last, rest) = events[0]
  decoded = lambda n: chat.decode(chat_tok, ids[0][:n])
  assert (r1, r2, rest, last) == (1.0, 0.0, 0.0, len(ids[0]) - 1)
  assert decoded(first + 1).endswith("5 - 2 = 3") and not decoded(first).endswith("5 - 2 = 3")
  assert decoded(second + 1).endswith("3 * 3 = 10")
  assert not decoded(second).endswith("3 * 3 = 10")
  short = "<think>Step 1: 5 - 2 = 3.</think>9"  # Step 2 not shown: its 0 on the last token.
  short_ids = chat.encode_text(chat_tok, short)
  (first, r1), (second, r2), (last, rest) = source._reward_events(
      [p], [short], [short_ids], np.array([3.0]))[0]  # Right answer (1) + one step (2 x 0.5).
  assert (r1, r2, rest) == (1.0, 0.0, 2.0) and second == last == len(short_ids) - 1
  assert chat.decode(chat_tok, short_ids[:first + 1]).endswith("5 - 2 = 3")


@pytest.fixture(scope="module")
def world(chat_tok):
  """A random tiny policy with the chat tokenizer, and arithmetic problems."""
  from conftest import small_config
  from model.transformer import init_model
  from posttrain.tasks import get_task
  policy = init_model(small_config(vocab_size=chat_tok.vocab_size, max_seq_len=64), seed=0)
  return policy, chat_tok, get_task("arithmetic").problems("train", 16)


def _grpo_loss(policy, batch, temperature=1.0):
  """The default GRPO loss (6 new tokens) on a served batch, jitted: (sum, weight, aux)."""
  from flax import nnx
  fn = nnx.jit(lambda m, b: grpo_loss(GrpoConfig(), 6, temperature=temperature)(m, b, None, 0))
  return fn(policy, jax.tree.map(jnp.asarray, batch))


def _parity(prompts, completions, **fields):
  return [float(len(c) % 2) for c in completions]


def test_packed_batches_give_the_padded_loss_and_gradient_per_micro_batch(world):
  """A packing layout adds a plan to each served batch and changes nothing else; the loss summed
  over the two micro-batches (each with its own packed rows) and its gradient are the padded
  batch's, routing replay included."""
  from flax import nnx
  import dataclasses
  policy, tok, problems = world
  problems = [dataclasses.replace(p, prompt=p.prompt[:8]) for p in problems[:8]] + problems[8:]
  cfg = RolloutConfig(prompts=4, samples=4, max_new_tokens=6, temperature=0.7, routing_replay=True)
  distinct = lambda prompts, completions, **f: [float(len(set(c))) for c in completions]
  make = lambda layout: RolloutBatches(problems, tok, RewardSet({"distinct": distinct},
                                                                {"distinct": 1.0}),
                                       cfg, "grpo", seed=5, packing=layout).next_batch(policy)
  padded = make(None)
  packed = make(PackLayout(policy.cfg.max_seq_len, chunks=2, min_rows=1, factor=2.0))
  assert set(packed) - set(padded) == set(packing_keys)
  for k in padded:
    np.testing.assert_array_equal(packed[k], padded[k])
  per = len(packed["pack_source"]) // 2
  assert per < 8  # Fewer rows than each micro-batch's 8.
  loss = grpo_loss(GrpoConfig(), 6, temperature=0.7)

  @nnx.jit
  def value_and_grad(model, batch):
    return nnx.value_and_grad(lambda m: loss(m, batch, None, 0)[:2], has_aux=True)(model)

  def micro_batches(batch):
    for c in range(2):
      yield {k: v[c * (len(v) // 2):(c + 1) * (len(v) // 2)] for k, v in batch.items()}

  results = {}
  for name, batch in (("padded", padded), ("packed", packed)):
    parts = [value_and_grad(policy, jax.tree.map(jnp.asarray, b)) for b in micro_batches(batch)]
    results[name] = (sum(float(p[0][0]) for p in parts), sum(float(p[0][1]) for p in parts),
                     jax.tree.map(lambda *g: sum(g), *[p[1] for p in parts]))
  assert results["packed"][1] == results["padded"][1] == 16
  np.testing.assert_allclose(results["packed"][0], results["padded"][0], atol=1e-5)
  leaves = lambda name: jax.tree.leaves(results[name][2])
  assert max(float(jnp.abs(g).max()) for g in leaves("padded")) > 1e-3
  for g, w in zip(leaves("packed"), leaves("padded")):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_rollout_batches_masks_logprobs_epochs_and_exact_resume(world):
  policy, tok, problems = world
  cfg = RolloutConfig(prompts=2, samples=3, max_new_tokens=6, epochs=2, minibatches=2)
  make = lambda: RolloutBatches(problems, tok, RewardSet({"parity": _parity}, {"parity": 1.0}),
                                cfg, "grpo", seed=3)
  a = make()
  served = [a.next_batch(policy) for _ in range(4)]  # One rollout: 2 epochs x 2 mini-batches.
  assert a.rollouts == 1
  for k in served[0]:
    np.testing.assert_array_equal(served[0][k], served[2][k])  # The second epoch repeats.
    np.testing.assert_array_equal(served[1][k], served[3][k])
  rows = np.concatenate([served[0]["tokens"], served[1]["tokens"]])
  assert rows.shape == (6, a.width) and served[0]["advantages"].shape == (3,)
  for b in served[:2]:
    on = b["completion_mask"] > 0
    assert on.any(axis=1).all()
    for row in range(3):  # Completion positions follow the prompt, contiguously.
      idx = np.flatnonzero(on[row])
      assert np.all(np.diff(idx) == 1) and np.all(b["tokens"][row, idx[-1] + 1:] == 0)
      assert b["tokens"][row, idx[0] - 1] == chat.special_id(tok, "<|assistant|>")
    # Several updates per rollout: the trainer's log-probs are taken at rollout time, and agree
    # with the sampler's (float32 CPU); the loss reports the mismatch.
    np.testing.assert_allclose(b["old_logprobs"][on], b["sampler_logprobs"][on], atol=1e-4)
    assert np.all(b["sampler_logprobs"][on] < 0) and np.all(b["old_logprobs"][~on] == 0)
    _, weight, aux = _grpo_loss(policy, b)
    diff = np.abs(b["old_logprobs"] - b["sampler_logprobs"])[on]
    np.testing.assert_allclose(aux["maxima"]["mismatch_max"], diff.max(), atol=1e-7)
    np.testing.assert_allclose(aux["sums"]["mismatch_mean"] / weight, diff.mean(), atol=1e-7)
  metrics = a.pop_metrics()
  assert 0 <= metrics["reward"] <= 1 and a.pop_metrics() == {}
  state = json.loads(json.dumps(a.get_state()))  # As the checkpoint stores it.
  b = make()
  b.set_state(state)
  for _ in range(2):
    x, y = a.next_batch(policy), b.next_batch(policy)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  with pytest.raises(ValueError, match="mini-batches into a rollout"):
    make().set_state(dict(state, served=1))


def test_routing_replay_rollouts_carry_the_sampled_experts(world):
  policy, tok, problems = world
  cfg = RolloutConfig(prompts=2, samples=2, max_new_tokens=6, routing_replay=True)
  src = RolloutBatches(problems, tok, RewardSet({"parity": _parity}, {"parity": 1.0}), cfg, "grpo")
  batch = src.next_batch(policy)
  replay, on = batch["replay_experts"], batch["completion_mask"] > 0
  layers, k = policy.cfg.num_moe_layers, policy.cfg.experts_per_token
  assert replay.shape == (4, layers, src.width, k) and replay.dtype == np.int32
  for row in range(4):  # Prompt and fed completion tokens recorded, nothing past the last fed one.
    fed = np.flatnonzero(on[row])[-1]
    assert (replay[row, :, :fed] >= 0).all() and (replay[row, :, fed:] == -1).all()
  loss_sum, weight, aux = _grpo_loss(policy, batch)
  assert np.isfinite(float(loss_sum)) and float(weight) == 4
  # One update per rollout: the loss's own forward (routed as the sampler was) is the trainer's.
  assert "old_logprobs" not in batch and float(aux["maxima"]["mismatch_max"]) < 1e-5


def test_one_update_per_rollout_takes_the_old_logprobs_from_its_own_forward(world):
  """Without old_logprobs in the batch the loss, its gradient and the mismatch metrics are those
  of the batch whose old log-probs a separate forward computed (the off-policy path)."""
  from flax import nnx
  from train.loss import jitted_logprobs
  policy, tok, problems = world
  cfg = RolloutConfig(prompts=2, samples=3, max_new_tokens=6)  # Sampling as compiled above.
  src = RolloutBatches(problems, tok, RewardSet({"parity": _parity}, {"parity": 1.0}), cfg, "grpo",
                       seed=3)
  assert not src.needs_old_logprobs
  batch = jax.tree.map(jnp.asarray, src.next_batch(policy))
  assert "old_logprobs" not in batch
  with_old = dict(batch, old_logprobs=jitted_logprobs(policy, batch["tokens"],
                                                      batch["completion_mask"])[0])
  loss = grpo_loss(GrpoConfig(tis_cap=2.0), 6)
  run = nnx.jit(lambda m, b: nnx.value_and_grad(lambda m: loss(m, b, None, 0)[::2],
                                                has_aux=True)(m))
  ((own, a), own_grads), ((sep, b), sep_grads) = run(policy, batch), run(policy, with_old)
  np.testing.assert_allclose(own, sep, rtol=1e-5)
  for g, h in zip(jax.tree.leaves(own_grads), jax.tree.leaves(sep_grads)):
    np.testing.assert_allclose(g, h, atol=1e-6)
  for k in ("mismatch_max", "is_ratio_max"):
    np.testing.assert_allclose(a["maxima"][k], b["maxima"][k], atol=1e-6)
  assert RolloutBatches(problems, tok, src.rewards, RolloutConfig(
      prompts=2, samples=2, max_new_tokens=6, epochs=2), "grpo").needs_old_logprobs


def test_sampler_old_logprobs_skip_the_forward_and_divide_by_the_sampler(world):
  """rollout.old_logprobs="sampler": a rollout serving two updates computes no old log-probs;
  its loss and gradient are those of the forward path's loss given the sampler's log-probs as
  the old ones, and its mismatch metrics those of the loss's own forward (one update)."""
  from flax import nnx
  policy, tok, problems = world
  cfg = RolloutConfig(prompts=2, samples=3, max_new_tokens=6, epochs=2, old_logprobs="sampler")
  src = RolloutBatches(problems, tok, RewardSet({"parity": _parity}, {"parity": 1.0}), cfg, "grpo",
                       seed=3)
  assert not src.needs_old_logprobs
  batch = jax.tree.map(jnp.asarray, src.next_batch(policy))
  assert "old_logprobs" not in batch
  perturbed = dict(batch, sampler_logprobs=batch["sampler_logprobs"]
                   - 0.05 * batch["completion_mask"])  # A visible ratio away from 1.
  cfg_loss = GrpoConfig()

  def run(loss, b):
    return nnx.jit(lambda m, b: nnx.value_and_grad(lambda m: loss(m, b, None, 0)[::2],
                                                   has_aux=True)(m))(policy, b)
  (sampler_loss, aux), grads = run(grpo_loss(cfg_loss, 6, old_from_sampler=True), perturbed)
  (given_loss, _), given_grads = run(grpo_loss(cfg_loss, 6),
                                     dict(perturbed, old_logprobs=perturbed["sampler_logprobs"]))
  (_, own_aux), _ = run(grpo_loss(cfg_loss, 6), perturbed)
  np.testing.assert_allclose(sampler_loss, given_loss, rtol=1e-6)
  for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(given_grads)):
    np.testing.assert_allclose(g, h, atol=1e-7)
  for k in ("mismatch_max", "is_ratio_max"):
    np.testing.assert_allclose(aux["maxima"][k], own_aux["maxima"][k], rtol=1e-6)
  assert float(aux["maxima"]["mismatch_max"]) == pytest.approx(0.05, abs=1e-4)


def test_dynamic_sampling_masks_groups_without_signal(world):
  policy, tok, problems = world
  cfg = RolloutConfig(prompts=2, samples=3, max_new_tokens=6, dynamic_sampling=True, max_refills=2,
                      temperature=0.7)
  constant = lambda prompts, completions, **f: [1.0] * len(completions)
  src = RolloutBatches(problems, tok, RewardSet({"one": constant}, {"one": 1.0}), cfg, "grpo")
  batch = src.next_batch(policy)
  m = src.pop_metrics()
  assert m["sampling_rounds"] == 3 and m["prompts_drawn"] == 6 and m["groups_masked"] == 2
  assert batch["completion_mask"].sum() == 0 and src.cursor == 6
  nan = lambda prompts, completions, **f: [float("nan")] + [0.0] * (len(completions) - 1)
  src = RolloutBatches(problems, tok, RewardSet({"nan": nan}, {"nan": 1.0}),
                       RolloutConfig(prompts=2, samples=3, max_new_tokens=6, temperature=0.7),
                       "dr_grpo")
  batch = src.next_batch(policy)
  m = src.pop_metrics()
  assert m["reward_nonfinite"] == 1
  # Below temperature 1 the trainer's log-probs are taken at the sampling temperature too.
  aux = _grpo_loss(policy, batch, 0.7)[2]
  assert 0 < float(aux["maxima"]["mismatch_max"]) < 1e-4
  assert np.isfinite(batch["advantages"]).all() and np.isfinite(src.buffer["advantages"]).all()
  assert (batch["completion_mask"].sum(1) == 0).sum() == 1  # Only the NaN row is dropped.


def test_process_rollouts_serve_per_token_advantages_and_a_loss(world):
  """A served batch under the process advantage: [rows, T] advantages equal to
  process_advantages of each row's events, placed after its own prompt (the random policy shows
  no step, so a row's step credits, 0, and the rest of its reward all sit on its last token)."""
  from posttrain import rollout
  from posttrain.tasks import get_task
  policy, tok, problems = world
  task = get_task("arithmetic")
  rewards = RewardSet({"parity": _parity, "steps": step_accuracy({"arithmetic": task})},
                      {"parity": 1.0, "steps": 1.0})
  src = RolloutBatches(problems, tok, rewards, RolloutConfig(prompts=2, samples=3,
                                                             max_new_tokens=6),
                       "process", seed=1, step_credit=step_credits({"arithmetic": task}, 1.0))
  batch = src.next_batch(policy)
  order = np.random.default_rng([1, 0, 1]).permutation(6)  # How _build shuffled the rows.
  served = {k: np.empty_like(v) for k, v in batch.items()}
  for k, v in batch.items():
    served[k][order] = v  # Back in rollout order: groups of 3 rows, one prompt each.
  picked = [src.problems[i] for i in src._order(0)[:2]]
  events = []
  for row in range(6):
    idx = np.flatnonzero(served["completion_mask"][row] > 0)
    text = rollout.response_text(tok, served["tokens"][row, idx[0]:idx[-1] + 1], "chat")
    steps = len(picked[row // 3].fields["ops"])
    events.append([(idx[-1], 0.0)] * steps + [(idx[-1], float(len(text) % 2))])
  want = process_advantages(events, 3, served["tokens"].shape[1])
  assert served["advantages"].shape == served["tokens"].shape and np.abs(want).max() > 0.1
  np.testing.assert_allclose(served["advantages"], want, rtol=1e-6, atol=1e-6)
  loss, weight, _ = _grpo_loss(policy, batch)
  assert weight == 6 and np.isfinite(float(loss))


@pytest.mark.slow
def test_grpo_end_to_end_resumes_exactly(tmp_path, tiny_pretrain):
  """From a 3-step pre-training, GRPO 4 steps (2 rollouts x 2 mini-batches, KL to the reference
  on); resumed from the step-2 checkpoint it ends with the uninterrupted run's parameters and
  metrics, bitwise."""
  from flax import nnx
  from configs.grpo import get_config as grpo_config
  from posttrain.grpo import grpo
  from train.checkpoint import load_model

  def config(steps):
    g = grpo_config("dapo")
    g.init_from = tiny_pretrain
    g.total_steps, g.log_every, g.checkpoint_every, g.peak_flops = steps, 1, 2, 1e11
    g.data.tasks, g.data.problems = "arithmetic", 20  # The steps reward checks arithmetic.
    g.rollout.update(prompts=2, samples=2, max_new_tokens=6, minibatches=2, max_refills=1)
    g.grpo.beta, g.rewards.format, g.rewards.steps = 0.04, 0.5, 0.5
    g.eval_every, g.eval.tasks, g.eval.problems = 2, "arithmetic", 3  # The held-out probe.
    return g
  rows = grpo(config(4), str(tmp_path / "run"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and "reward_steps" in r for r in rows if r["step"] % 2)
  assert [("eval_arithmetic_pass_at_1" in r) for r in rows] == [False, True, False, True]
  assert (tmp_path / "run" / "grpo.png").exists()
  full = jax.tree.leaves(nnx.state(load_model(str(tmp_path / "run"))))
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # As if killed before the last save.
  resumed = grpo(config(4), str(tmp_path / "run"))
  assert [r["step"] for r in resumed] == [3, 4]
  for before, after in zip(rows[2:], resumed):  # Step 3 sampled the second rollout.
    keys = {"loss", "grad_norm", "kl"} | ({"reward", "completion_length"} if "reward" in before else set())
    assert {k: before[k] for k in keys} == {k: after[k] for k in keys}
  assert "reward" in resumed[0]
  for x, y in zip(full, jax.tree.leaves(nnx.state(load_model(str(tmp_path / "run"))))):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="multiple of the 2 updates per rollout"):
    grpo(dict_update(config(4), total_steps=5), str(tmp_path / "odd"))


def dict_update(c, **changes):
  for k, v in changes.items():
    setattr(c, k, v)
  return c
