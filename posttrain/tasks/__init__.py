"""Verifiable task families: prompt generators with reference solutions, and verifiers.

  get_task("arithmetic"), get_task("countdown"), get_task("program"),
  get_task("gsm8k", data="test.jsonl"), get_task("math", data="test.jsonl")
"""

from __future__ import annotations

from posttrain.tasks.arithmetic import Arithmetic
from posttrain.tasks.base import Problem, Task, Verdict
from posttrain.tasks.countdown import Countdown
from posttrain.sandbox import SandboxUnavailable
from posttrain.tasks.program import Program
from posttrain.tasks.real import MathData

BUILTIN = {"arithmetic": Arithmetic, "countdown": Countdown, "program": Program}
DATA_FORMATS = ("gsm8k", "math")


def task_names(text: str) -> list[str]:
  """The family names of a comma-separated list ("arithmetic, countdown"), blanks dropped."""
  return [name.strip() for name in text.split(",") if name.strip()]


def get_task(name: str, data: str = "", **knobs) -> Task:
  """The task family `name` with difficulty `knobs`; gsm8k and math read the JSONL file `data`."""
  if name in BUILTIN:
    if data:
      raise ValueError(f"task {name!r} is generated; it takes no data file (got {data!r})")
    return BUILTIN[name](**knobs)
  if name in DATA_FORMATS:
    if not data:
      raise ValueError(f"task {name!r} needs a JSONL file: pass data=... (--data=FILE.jsonl)")
    return MathData(data, name)
  raise ValueError(f"unknown task {name!r}; known: {sorted(BUILTIN) + list(DATA_FORMATS)}")
