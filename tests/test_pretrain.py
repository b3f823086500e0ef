"""The pre-training loop's guards: a changed run config is refused; runs of skipped steps restore the
last checkpoint. (Killed runs resume exactly: tests/test_kill_harness.py.)"""

import json

import pytest


def test_mismatched_config_names_the_field(tmp_path):
  from train.checkpoint import check_run_config
  check_run_config(str(tmp_path), {"model": {"d_model": 128}, "seed": 0})
  check_run_config(str(tmp_path), {"model": {"d_model": 128}, "seed": 1})  # No work yet: replaced.
  assert json.loads((tmp_path / "run_config.json").read_text())["seed"] == 1
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # Work to protect.
  check_run_config(str(tmp_path), {"model": {"d_model": 128}, "seed": 1})
  with pytest.raises(ValueError, match=r"trained with seed=1, this run asks for seed=2"):
    check_run_config(str(tmp_path), {"model": {"d_model": 128}, "seed": 2})


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
