"""Kill anywhere (tests/kill_harness.py): each stage's real command is SIGKILLed at a few kill
points (inside a step, during an asynchronous checkpoint write, during a GRPO rollout), re-run,
and must resume from its last complete checkpoint and end bitwise where an uninterrupted run
ends, with the same logged metrics. The soak (many kills) is `python -m tests.kill_harness`."""

import json
import shutil

import numpy as np
import pytest

from tests import kill_harness

# Each stage: the kill point of its CI round, so that every kind of kill point is hit at least
# once (the soak, `python -m tests.kill_harness`, draws many at random in every stage).
ROUNDS = {"pretrain": ["step"], "sft": ["checkpoint"], "dpo": ["step"], "grpo": ["rollout"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """One directory for every stage's runs: the uninterrupted runs and the compilation cache are
  shared (the post-training stages start from the pre-training run)."""
  return str(tmp_path_factory.mktemp("kills"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(ROUNDS))
def test_killed_stage_resumes_exactly(root, stage):
  rng = np.random.default_rng(list(ROUNDS).index(stage))
  result = kill_harness.kill_round(stage, root, ROUNDS[stage], rng)
  print(json.dumps(result))
  assert [k["point"] for k in result["kills"]] == ROUNDS[stage]
  assert all(k["killed"] for k in result["kills"]), result["kills"]
  assert not result["failures"], result["failures"]


@pytest.mark.slow
def test_the_comparison_sees_a_difference(root, tmp_path):
  """The check the kill tests rely on reports a different train state and a changed metric."""
  env = kill_harness.environment(f"{root}/jax_cache")
  sft, _ = kill_harness.reference_run("sft", root, env)
  dpo, _ = kill_harness.reference_run("dpo", root, env)
  assert kill_harness.differences(sft, sft) == []
  found = kill_harness.differences(sft, dpo)
  assert any(d.startswith("state/params/") for d in found), found
  copy = tmp_path / "copy"
  shutil.copytree(sft, copy)
  lines = (copy / "metrics.jsonl").read_text().splitlines()
  row = json.loads(lines[4])
  row["loss"] += 1e-7
  lines[4] = json.dumps(row)
  (copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  assert kill_harness.differences(sft, str(copy)) == [
      f"step 5 loss: {row['loss']!r}, uninterrupted {row['loss'] - 1e-7!r}"]
