"""The command line every post-training stage shares: `--config=configs/STAGE.py` (ml_collections,
every field overridable as `--config.a.b=v`) and `--workdir`; re-running the same command resumes."""

from __future__ import annotations

import os
from typing import Callable

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def run_stage_cli(stage: str, run: Callable, summary: Callable[[dict], str]) -> None:
  """Defines the flags, then runs `run(config, workdir)` and prints `summary(last logged row)`;
  `stage` names the default config file (configs/STAGE.py) and workdir (workdir/STAGE)."""
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, f"{stage}.py"),
                                           "Run config file.")
  workdir = flags.DEFINE_string("workdir", f"workdir/{stage}", "Checkpoints, metrics, tokenizer.")

  def main(argv):
    del argv
    from train.metrics import quiet_logging
    quiet_logging()
    rows = run(config.value, workdir.value)
    if rows:
      print(f"done: step {rows[-1]['step']} {summary(rows[-1])}", flush=True)
  app.run(main)
