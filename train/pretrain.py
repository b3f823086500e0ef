"""Pre-training entry point.

  python -m train.pretrain                      # tiny model on the built-in corpus, ./workdir/pretrain
  python -m train.pretrain --config=configs/pretrain.py --workdir=DIR --config.total_steps=1000

Re-running the same command resumes from the latest checkpoint in DIR.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from train import distributed

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "pretrain.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Run config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pretrain", "Checkpoints, metrics, tokenizer.")


def main(argv):
  del argv
  from train.metrics import quiet_logging
  quiet_logging()
  distributed.initialize()  # A no-op unless the job has several processes.
  from train.loop import pretrain  # After distributed initialisation.
  rows = pretrain(_CONFIG.value, _WORKDIR.value)
  if rows:
    print(f"done: step {rows[-1]['step']} loss {rows[-1]['loss']:.4f}", flush=True)


if __name__ == "__main__":
  app.run(main)
