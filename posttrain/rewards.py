"""Reward callables, as in TRL and tunix: `(prompts, completions, **fields) -> list[float]`.

`prompts` and `completions` are texts (a completion is the assistant turn up to `<|end|>`);
`fields` are per-row lists the caller passes along (here `problems`: the task Problem of each
row). An RL stage combines several rewards with weights and logs each one separately
(`RewardSet`). A non-finite value stays NaN: the RL stage drops that row from the update and
counts it (reward_nonfinite), never replacing it with a made-up score. A reward that raises
scores the whole batch NaN the same way, with a warning and a count (reward_NAME_errors); one that
raises in `max_consecutive_errors` rollouts in a row stops the run with its error. Rewards of
weight 0 are logged only and never void the total. One that returns the wrong number of values
stops the run at once (that is a bug, not a passing fault).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Callable, Sequence

import numpy as np

from posttrain.chat import parse_response
from posttrain.tasks.base import verify_all

Reward = Callable[..., list]


def task_accuracy(tasks: dict) -> Reward:
  """Verifier accuracy over problems of several families (`tasks`: name -> task): each row is
  scored by its own task's verifier (1 right, 0 wrong)."""
  def accuracy(prompts, completions, problems, **fields):
    del prompts, fields
    unknown = sorted({p.task for p in problems} - set(tasks))
    if unknown:
      raise ValueError(f"task_accuracy: no verifier for task families {unknown}")
    scores = [0.0] * len(problems)
    for name, task in tasks.items():  # One batch per family (program writing runs a pool).
      rows = [i for i, p in enumerate(problems) if p.task == name]
      verdicts = verify_all(task, [problems[i] for i in rows], [completions[i] for i in rows])
      for i, verdict in zip(rows, verdicts):
        scores[i] = float(verdict.score)
    return scores
  return accuracy


def think_format(prompts, completions, **fields) -> list[float]:
  """1 for `<think>reasoning</think>answer` (posttrain.chat.parse_response's well formed), else 0."""
  del prompts, fields
  return [1.0 if parse_response(c).well_formed else 0.0 for c in completions]


def step_accuracy(tasks: dict) -> Reward:
  """A process reward: each row's `task.step_score(problem, completion)` in [0, 1], the fraction
  of the problem's own steps its reasoning carries out right before its first mistake (the
  families that have one: arithmetic, and countdown, whose steps count when they are legal
  moves). ValueError for a family without step checks."""
  def steps(prompts, completions, problems, **fields):
    del prompts, fields
    missing = sorted({p.task for p in problems if not hasattr(tasks.get(p.task), "step_score")})
    if missing:
      raise ValueError(f"step_accuracy: task families {missing} have no step checks")
    return [tasks[p.task].step_score(p, c) for p, c in zip(problems, completions)]
  return steps


def step_credits(tasks: dict, weight: float):
  """`step_accuracy` placed where it is earned, for the process advantage: a callable
  `(problems, completions) -> per row [(character end, weight x credit)]`, one per step of the
  problem (`task.step_credit`); each row's credits sum to weight x its step_accuracy."""
  missing = sorted(n for n, t in tasks.items() if not hasattr(t, "step_credit"))
  if missing:
    raise ValueError(f"step_credits: task families {missing} have no step checks")

  def credits(problems, completions):
    return [[(end, weight * credit) for end, credit in tasks[p.task].step_credit(p, c)]
            for p, c in zip(problems, completions)]
  return credits


def length_penalty(max_tokens: int, cache_tokens: int) -> Reward:
  """DAPO's soft overlong penalty on completion token counts (`lengths` field): 0 up to
  max_tokens - cache_tokens, then falling linearly to -1 at max_tokens (and -1 beyond)."""
  if not 0 < cache_tokens <= max_tokens:
    raise ValueError(f"length_penalty: need 0 < cache_tokens <= max_tokens, got {cache_tokens}, "
                     f"{max_tokens}")

  def overlong(prompts, completions, lengths, **fields):
    del prompts, completions, fields
    free = max_tokens - cache_tokens
    return [max(-1.0, min(0.0, (free - n) / cache_tokens)) for n in lengths]
  return overlong


def _check_signature(name: str, fn: Reward) -> None:
  """TypeError unless `fn` can be called as fn(prompts, completions, **fields)."""
  if not callable(fn):
    raise TypeError(f"reward {name!r} is a {type(fn).__name__}, not a callable")
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # Builtins and extensions without a signature: trusted.
    return
  kinds = [p.kind for p in params.values()]
  positional = [p for p in params.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if ((len(positional) < 2 and inspect.Parameter.VAR_POSITIONAL not in kinds)
      or inspect.Parameter.VAR_KEYWORD not in kinds):
    raise TypeError(f"reward {name!r}: a reward is called as fn(prompts, completions, **fields) "
                    f"(fields such as problems= and lengths=); its signature is "
                    f"{inspect.signature(fn)}")


@dataclasses.dataclass
class RewardSet:
  """Named rewards with weights: `total = sum_i weight_i * reward_i`, each also reported."""

  rewards: dict  # name -> callable.
  weights: dict  # name -> float.
  max_consecutive_errors: int = 3  # Rollouts in a row a reward may raise in before the run stops.

  def __post_init__(self):
    self.errors = {name: 0 for name in self.rewards}  # Calls that raised, since pop_errors.
    self.streak = {name: 0 for name in self.rewards}  # Consecutive rollouts with a raise.
    self.last_error = {name: "" for name in self.rewards}
    if not self.rewards:
      raise ValueError("RewardSet needs at least one reward")
    missing = sorted(set(self.rewards) - set(self.weights))
    if missing:
      raise ValueError(f"RewardSet: no weight for rewards {missing}")
    for name, fn in self.rewards.items():
      _check_signature(name, fn)

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields):
    """(total [N], {name: values [N]}) for N completions."""
    n = len(completions)
    parts = {}
    for name, fn in self.rewards.items():
      try:
        values = fn(list(prompts), list(completions), **fields)
      except Exception as e:  # pylint: disable=broad-except  # Any failure of user code.
        self.errors[name] += 1
        self.last_error[name] = f"{type(e).__name__}: {e}"
        print(f"WARNING: reward {name!r} raised {self.last_error[name]}; its {n} rows score NaN "
              "and are left out of this update", file=sys.stderr, flush=True)
        parts[name] = np.full((n,), np.nan)
        continue
      try:
        values = np.asarray(list(values), np.float64)
      except (TypeError, ValueError) as e:
        raise TypeError(f"reward {name!r} must return a list of {n} numbers, got "
                        f"{type(values).__name__}: {e}") from e
      if values.shape != (n,):
        raise ValueError(f"reward {name!r} returned {values.size} values for {n} completions")
      parts[name] = values
    # Only weighted rewards make the total: one that is logged only (weight 0) cannot void it.
    total = sum((self.weights[k] * v for k, v in parts.items() if self.weights[k]), np.zeros(n))
    return total, parts

  def pop_errors(self) -> dict:
    """{"reward_NAME_errors": calls of NAME that raised} since the last call, for every reward;
    called once per rollout. A RuntimeError when a reward has raised in `max_consecutive_errors`
    rollouts in a row (a refill of dynamic sampling is the same rollout)."""
    for name, count in self.errors.items():
      self.streak[name] = self.streak[name] + 1 if count else 0
      if self.streak[name] >= self.max_consecutive_errors:
        raise RuntimeError(f"reward {name!r} raised in {self.streak[name]} rollouts in a row; "
                           f"the last error: {self.last_error[name]}")
    counts = {f"reward_{k}_errors": float(v) for k, v in self.errors.items()}
    self.errors = {k: 0 for k in self.errors}
    return counts
