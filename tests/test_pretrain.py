"""The pre-training entry point end to end: a SIGKILLed run resumes and reproduces the losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.total_steps=14", "--config.optimizer.warmup_steps=3", "--config.log_every=1", "--config.checkpoint_every=4",
         "--config.eval_every=7", "--config.eval_batches=1", "--config.data.builtin_docs=1500",
         "--config.data.batch_size=4", "--config.data.seq_len=64",
         "--config.tokenizer.train_docs=400", "--config.model_overrides.vocab_size=320",
         "--config.peak_flops=1e11"]


def _command(workdir):
  return [sys.executable, "-m", "train.pretrain", f"--workdir={workdir}", *FLAGS]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(row["step"], row["loss"]) for row in map(json.loads, f)]


@pytest.mark.slow
def test_killed_run_resumes_and_matches_uninterrupted(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  full = tmp_path / "full"
  subprocess.run(_command(full), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  reference = dict(_losses(full))
  assert sorted(reference) == list(range(1, 15))
  assert reference[14] < reference[1]

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline:
    if (killed / "metrics.jsonl").exists() and max(s for s, _ in _losses(killed)) >= 10:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = _losses(killed)
  assert max(s for s, _ in first) < 14, "the run finished before it could be killed"
  resumed = subprocess.run(_command(killed), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stdout
  after = _losses(killed)[len(first):]
  assert after and after[0][0] in (5, 9, 13) and after[-1][0] == 14
  for step, loss in after:
    assert loss == reference[step], (step, loss, reference[step])  # Bitwise on CPU.


def test_mismatched_config_names_the_field(tmp_path):
  from train.checkpoint import check_run_config
  check_run_config(str(tmp_path), {"model": {"d_model": 128}, "seed": 0})
  check_run_config(str(tmp_path), {"model": {"d_model": 128}, "seed": 0})
  with pytest.raises(ValueError, match=r"trained with seed=0, this run asks for seed=1"):
    check_run_config(str(tmp_path), {"model": {"d_model": 128}, "seed": 1})


@pytest.mark.slow
def test_bad_steps_restore_the_last_checkpoint_then_give_up(tmp_path, capsys):
  """An absurd learning rate blows the weights up: every later step is skipped, each run of
  `max_bad_steps` restores the last checkpoint, and after three restores the run stops."""
  from configs.pretrain import get_config
  from train.loop import pretrain
  c = get_config()
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 12, 1, 1, 0
  c.max_bad_steps = 2
  c.optimizer.peak_lr, c.optimizer.warmup_steps = 1e30, 0
  c.data.builtin_docs, c.data.batch_size, c.data.seq_len = 300, 2, 32
  c.tokenizer.train_docs, c.model_overrides.vocab_size, c.peak_flops = 300, 320, 1e11
  with pytest.raises(RuntimeError, match="three restores already"):
    pretrain(c, str(tmp_path))
  out = capsys.readouterr().out
  assert out.count("consecutive skipped steps; restored the checkpoint of step") == 3
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["bad_streak"] >= 1 and all(r["skipped"] >= 1 for r in rows[1:])
