"""Prints a preset's parameter counts and training FLOPs per token as JSON (shapes only, no memory).

  python -m model.summary --preset=deepseek_v3_671b
  python -m model.summary --preset=all

Step throughput is measured by bench/pretrain_step.py.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from model.config import PRESETS, ModelConfig, get_preset

def _define_flags():
  """The CLI's flags, registered only when run as a program (importing stays flag-free)."""
  flags.DEFINE_string("preset", "tiny", "A preset name from model.config.PRESETS, or 'all'.")
  flags.DEFINE_integer("seq_len", 4096, "Sequence length for FLOPs per token.")


def describe(name: str, cfg: ModelConfig, seq_len: int) -> dict:
  """Parameter counts (from shapes alone) and training FLOPs per token of a config."""
  start = time.perf_counter()
  counts = cfg.param_counts()
  return dict(preset=name, **counts, flops_per_token=cfg.flops_per_token(seq_len),
              seq_len=seq_len, eval_shape_seconds=round(time.perf_counter() - start, 3))


def main(argv):
  """Prints one JSON line per preset named by --preset."""
  del argv
  f = flags.FLAGS
  names = sorted(PRESETS) if f.preset == "all" else [f.preset]
  for name in names:
    print(json.dumps(describe(name, get_preset(name), f.seq_len)), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
