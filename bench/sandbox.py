"""Sandbox throughput: short programs per second through posttrain/sandbox.py, one at a time and
through the worker pool, under namespace isolation and rlimits only (JSON lines).

  .venv/bin/python -m bench.sandbox --programs=64 --workers=1,2,4

Each program is a program-task check: a reference solution with its hidden tests (what an RL
reward over code runs per completion).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from posttrain import sandbox
from posttrain.tasks import get_task

_PROGRAMS = flags.DEFINE_integer("programs", 64, "Programs per measurement.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2", "4"], "Pool sizes.")


def main(argv):
  del argv
  problems = get_task("program").problems("train", _PROGRAMS.value)
  available, why = sandbox.namespaces_available()
  for isolation in ("namespaces", "rlimits"):
    if isolation == "namespaces" and not available:
      print(json.dumps(dict(kind="sandbox", isolation=isolation, error=why)), flush=True)
      continue
    for workers in map(int, _WORKERS.value):
      checker = get_task("program", isolation=isolation, workers=workers)
      start = time.perf_counter()
      verdicts = checker.verify_many(problems, [p.solution for p in problems])
      seconds = time.perf_counter() - start
      print(json.dumps(dict(kind="sandbox", isolation=isolation, workers=workers,
                            programs=len(problems), correct=sum(v.correct for v in verdicts),
                            seconds=round(seconds, 3),
                            programs_per_sec=round(len(problems) / seconds, 1),
                            cpu_count=os.cpu_count())), flush=True)


if __name__ == "__main__":
  app.run(main)
