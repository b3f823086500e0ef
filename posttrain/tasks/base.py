"""What every verifiable task family provides: problems with reference solutions, and a verifier.

A `Problem` is one prompt with its reference answer and a worked reference solution (reasoning in
`<think>`, then the answer, as the chat format writes an assistant turn). A task's `verify`
returns a `Verdict`: a score in [0, 1] and the reason for it. Train and held-out problems never
coincide: each family splits by a hash of the problem's canonical key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem of a task family."""

  task: str  # The family's name, e.g. "arithmetic".
  key: str  # Canonical identity; the train/test split is a function of it.
  prompt: str  # The user message.
  answer: str  # The reference answer, as the verifier compares it.
  solution: str  # A worked reference assistant turn: "<think>reasoning</think>answer".
  difficulty: int = 0  # The family's difficulty knob (e.g. the number of steps).
  fields: dict = dataclasses.field(default_factory=dict)  # What the verifier needs beyond `answer`.


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A verifier's judgement of one response: score in [0, 1] and why."""

  score: float
  reason: str

  @property
  def correct(self) -> bool:
    return self.score >= 1.0


class Task(Protocol):
  """A verifiable task family."""

  name: str

  def problems(self, split: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of `split` ("train" or "test"), deterministic in `seed`."""

  def verify(self, problem: Problem, response: str) -> Verdict:
    """Scores an assistant response (its text after `<|assistant|>`) against `problem`."""


def verify_all(task: Task, problems: list[Problem], responses: list[str]) -> list[Verdict]:
  """task.verify over paired problems and responses, batched through the task's `verify_many`
  where it has one (program writing runs its sandbox pool)."""
  if len(problems) != len(responses):
    raise ValueError(f"verify_all: {len(problems)} problems for {len(responses)} responses")
  if hasattr(task, "verify_many"):
    return task.verify_many(list(problems), list(responses))
  return [task.verify(p, r) for p, r in zip(problems, responses)]


def check_split(split: str) -> None:
  """ValueError unless `split` is one of SPLITS."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def distinct(sample, count: int, split: str, held_out, max_tries_per_problem: int = 1000):
  """`count` problems from `sample()` whose key lies in `split` (held_out(key) is True for
  "test"), without repeats. RuntimeError if the family cannot supply that many."""
  check_split(split)
  want_held_out = split == "test"
  seen, out = set(), []
  for _ in range(count * max_tries_per_problem):
    if len(out) == count:
      break
    p = sample()
    if p.key in seen or held_out(p.key) != want_held_out:
      continue
    seen.add(p.key)
    out.append(p)
  if len(out) < count:
    raise RuntimeError(f"could only generate {len(out)} distinct {split} problems of {count}: "
                       "raise the difficulty knobs")
  return out


def field(problem: Problem, name: str) -> Any:
  """problem.fields[name], or a ValueError naming the problem and the missing field."""
  if name not in problem.fields:
    raise ValueError(f"problem {problem.key!r} ({problem.task}) has no field {name!r}")
  return problem.fields[name]
