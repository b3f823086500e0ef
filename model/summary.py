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

_PRESET = flags.DEFINE_string("preset", "tiny", "A preset name from model.config.PRESETS, or 'all'.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Sequence length for FLOPs per token.")


def describe(name: str, cfg: ModelConfig, seq_len: int) -> dict:
  """Parameter counts (from shapes alone) and training FLOPs per token of a config."""
  start = time.perf_counter()
  counts = cfg.param_counts()
  return dict(preset=name, **counts, flops_per_token=cfg.flops_per_token(seq_len),
              seq_len=seq_len, eval_shape_seconds=round(time.perf_counter() - start, 3))


def main(argv):
  del argv
  names = sorted(PRESETS) if _PRESET.value == "all" else [_PRESET.value]
  for name in names:
    cfg = get_preset(name)
    print(json.dumps(describe(name, cfg, _SEQ_LEN.value)), flush=True)


if __name__ == "__main__":
  app.run(main)
