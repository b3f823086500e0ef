"""Faults injected into real runs: NaN gradients and a loss spike at step k, a reward that raises
or returns NaN at rollout k, and broken checkpoints (a truncated file, a missing file, a checkpoint
of another model, none left). The guard acts as documented and the counters show it; a broken
checkpoint falls back to the previous good one with a warning, and nothing starts over silently."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pretrain import get_config
from train.loop import pretrain, pretrain_stage, run
from train.metrics import read_metrics
from train.step import StepConfig, pretrain_loss


def _pretrain_config(steps: int, checkpoint_every: int):
  c = get_config()
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = steps, 1, checkpoint_every, 0
  c.keep_checkpoints, c.optimizer.warmup_steps, c.peak_flops = 5, 1, 1e11
  c.data.builtin_docs, c.data.batch_size, c.data.seq_len = 300, 2, 32
  # Vocabulary 384: another model than the tests' shared tiny pre-training (320).
  c.tokenizer.train_docs, c.model_overrides.vocab_size = 300, 384
  return c


def nan_gradients_at(k: int, loss_fn):
  """`loss_fn` whose gradients are NaN (its loss still finite) at step index k: the gradient of
  sqrt(|x - stop_gradient(x)|) at 0 is inf x 0."""
  def faulty(model, batch, frozen, step):
    loss_sum, weight, aux = loss_fn(model, batch, frozen, step)
    poison = jax.lax.cond(step == k, lambda x: jnp.sqrt(jnp.abs(x - jax.lax.stop_gradient(x))),
                          jnp.zeros_like, loss_sum)
    return loss_sum + poison, weight, aux
  return faulty


def spike_at(k: int, factor: float, loss_fn):
  """`loss_fn` whose loss is `factor` times larger at step index k."""
  def faulty(model, batch, frozen, step):
    loss_sum, weight, aux = loss_fn(model, batch, frozen, step)
    scale = jnp.where(step == k, factor, 1.0)
    sums = dict(aux["sums"], loss=aux["sums"]["loss"] * scale)
    return loss_sum * scale, weight, dict(aux, sums=sums)
  return faulty


@pytest.mark.slow
def test_nan_gradients_and_a_loss_spike_are_skipped_counted_and_survived(tmp_path):
  c = _pretrain_config(steps=9, checkpoint_every=9)
  c.step.spike_zscore, c.step.spike_window, c.max_bad_steps = 6.0, 3, 2
  stage = pretrain_stage(c, str(tmp_path))
  stage.loss_fn = spike_at(6, 100.0, nan_gradients_at(3, pretrain_loss(StepConfig(**c.step))))
  rows = {r["step"]: r for r in run(stage, c, str(tmp_path))}
  assert sorted(rows) == list(range(1, 10))  # Training went on to the end.
  # Step 4 (index 3): finite loss, NaN gradients: skipped, counted, the streak reset after.
  assert np.isfinite(rows[4]["loss"]) and np.isnan(rows[4]["grad_norm"])
  assert (rows[3]["skipped"], rows[4]["skipped"], rows[4]["bad_streak"]) == (0, 1, 1)
  assert rows[5]["bad_streak"] == 0 and not rows[4]["loss_spike"]
  # Step 7 (index 6): a loss 100x the window's: skipped as a spike.
  assert rows[7]["loss_spike"] == 1 and rows[7]["skipped"] == 2 and rows[7]["bad_streak"] == 1
  assert rows[7]["loss"] > 20 * rows[6]["loss"]
  assert rows[9]["skipped"] == 2 and rows[9]["bad_streak"] == 0 and np.isfinite(rows[9]["loss"])


@pytest.mark.slow
def test_the_guard_reads_the_streak_one_step_late_between_logs_and_restores(tmp_path, capsys):
  """Between logged and checkpointed steps the host reads a step's bad-step streak only after
  queueing the next step: NaN gradients at steps 5 and 6 (streak 2 at step 6) restore the
  checkpoint of step 4 at step 7; the fault recurs after each restore, and the third stops the run."""
  c = _pretrain_config(steps=12, checkpoint_every=4)
  c.log_every, c.max_bad_steps = 4, 2
  stage = pretrain_stage(c, str(tmp_path))
  stage.loss_fn = nan_gradients_at(5, nan_gradients_at(4, pretrain_loss(StepConfig(**c.step))))
  with pytest.raises(RuntimeError, match="three restores already"):
    run(stage, c, str(tmp_path))
  out = capsys.readouterr().out
  assert out.count("step 7: 2 consecutive skipped steps; restored the checkpoint of step 4") == 3


@pytest.mark.slow
def test_a_reward_that_raises_or_returns_nan_is_counted_and_survived(tmp_path, tiny_pretrain,
                                                                     capsys):
  from configs.grpo import get_config as grpo_config
  from posttrain.grpo import grpo_stage
  g = grpo_config()
  g.init_from = tiny_pretrain
  g.total_steps, g.log_every, g.checkpoint_every, g.peak_flops = 4, 1, 4, 1e11
  g.data.problems = 20
  g.rollout.update(prompts=2, samples=2, max_new_tokens=6)
  g.rewards.format = 0.5
  stage = grpo_stage(g, str(tmp_path))
  rewards = stage.batches.rewards.rewards
  calls = {"n": 0}
  accuracy = rewards["accuracy"]

  def faulty(prompts, completions, **fields):
    calls["n"] += 1
    if calls["n"] == 2:
      raise ConnectionError("the verifier service went away")
    if calls["n"] == 3:
      return [float("nan")] * len(completions)
    return accuracy(prompts, completions, **fields)
  rewards["accuracy"] = faulty
  rows = {r["step"]: r for r in run(stage, g, str(tmp_path))}
  assert sorted(rows) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows.values())
  assert [rows[s]["reward_accuracy_errors"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
  assert [rows[s]["reward_nonfinite"] for s in (1, 2, 3, 4)] == [0, 4, 4, 0]
  assert rows[2]["completion_tokens"] == 0 and rows[4]["completion_tokens"] > 0
  assert "reward 'accuracy' raised ConnectionError: the verifier service went away" in (
      capsys.readouterr().err)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
  """A pre-training run of 6 steps with checkpoints at 2, 4 and 6, and its final parameters."""
  from train.checkpoint import load_model
  from flax import nnx
  workdir = str(tmp_path_factory.mktemp("six"))
  pretrain(_pretrain_config(6, 2), workdir)
  return workdir, [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_model(workdir)))]


def _copy(six_steps, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(six_steps[0], workdir)
  return workdir


def _largest_file(path):
  files = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_broken_checkpoint_falls_back_to_the_previous_one(six_steps, tmp_path, capsys, damage):
  from train.checkpoint import load_model
  from flax import nnx
  workdir = _copy(six_steps, tmp_path)
  victim = _largest_file(os.path.join(workdir, "checkpoints", "6", "state"))
  if damage == "truncated":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  else:
    os.remove(victim)
  rows = pretrain(_pretrain_config(6, 2), workdir)
  out = capsys.readouterr()
  assert "checkpoints/6 cannot be restored" in out.err and "resumed from" in out.out
  assert f"{workdir}/checkpoints step 4" in out.out
  assert [r["step"] for r in rows] == [5, 6]
  assert len(glob.glob(os.path.join(workdir, "checkpoints", "6.unreadable-*"))) == 1
  # Steps 5 and 6 again, from step 4's state and data position: the same parameters, bitwise.
  for want, got in zip(six_steps[1], jax.tree.leaves(nnx.state(load_model(workdir)))):
    np.testing.assert_array_equal(want, np.asarray(got))
  assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 7))


@pytest.mark.slow
def test_checkpoints_of_another_model_or_none_left_are_errors_that_keep_everything(
    six_steps, tiny_pretrain, tmp_path):
  workdir = _copy(six_steps, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  for step in ("2", "4", "6"):
    shutil.rmtree(os.path.join(checkpoints, step))
  foreign = os.path.join(checkpoints, "6")
  shutil.copytree(os.path.join(tiny_pretrain, "checkpoints", "3"), foreign)  # Another model.
  before = sorted(os.listdir(checkpoints))
  with pytest.raises(ValueError, match=r"checkpoints: no checkpoint could be restored: step 6: "):
    pretrain(_pretrain_config(6, 2), workdir)
  assert sorted(os.listdir(checkpoints)) == before  # Nothing moved or deleted.
  shutil.rmtree(foreign)  # An empty checkpoint directory, while the metrics reach step 6.
  metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
  with pytest.raises(ValueError, match=r"holds no checkpoint, but .*metrics.jsonl logs steps up "
                                       r"to 6 \(checkpoints every 2\)"):
    pretrain(_pretrain_config(6, 2), workdir)
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics
  assert json.loads(metrics.splitlines()[-1])["step"] == 6
