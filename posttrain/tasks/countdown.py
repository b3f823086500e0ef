"""Countdown: reach the target from the given numbers, each used at most once, with + - * / and
parentheses. Answers are checked by the safe parser in `expression.py`, never `eval`.

Knobs: how many numbers and how large. Every generated puzzle is solvable: its numbers are
combined left to right into the target, which is the reference solution.
"""

from __future__ import annotations

import collections
import dataclasses
import random

from posttrain.chat import THINK_CLOSE, assistant_content, parse_response
from posttrain.tasks.arithmetic import reasoning_steps
from posttrain.tasks.base import Problem, Verdict, distinct, field
from posttrain.tasks.expression import ExpressionError, evaluate
from train import corpus
from train.corpus import OPS, calculation_steps, countdown_key, is_held_out, random_countdown


@dataclasses.dataclass(frozen=True)
class Countdown:
  """Puzzles over min_numbers..max_numbers integers in [1, number_max]."""

  min_numbers: int = corpus.COUNTDOWN_NUMBERS[0]
  max_numbers: int = corpus.COUNTDOWN_NUMBERS[1]
  number_max: int = corpus.COUNTDOWN_MAX
  name: str = "countdown"

  def __post_init__(self):
    if not 2 <= self.min_numbers <= self.max_numbers:
      raise ValueError(f"countdown: need 2 <= min_numbers <= max_numbers, got {self.min_numbers}, "
                       f"{self.max_numbers}")

  def make(self, numbers, ops) -> Problem:
    """The puzzle whose reference solution combines `numbers` left to right with `ops`."""
    expr, steps, target = calculation_steps(numbers[0], list(zip(ops, numbers[1:])))
    reasoning = " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps)
    return Problem(task=self.name, key=countdown_key(numbers, target),
                   prompt=f"Using {', '.join(map(str, numbers))} make {target}.", answer=expr,
                   solution=assistant_content(reasoning, expr), difficulty=len(numbers),
                   fields=dict(numbers=list(numbers), target=target))

  def problems(self, split: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct puzzles of `split`, deterministic in `seed`."""
    r = random.Random(f"countdown:{seed}:{split}")

    def sample():
      numbers, ops, _, _ = random_countdown(r, r.randint(self.min_numbers, self.max_numbers),
                                            self.number_max)
      return self.make(numbers, ops)
    return distinct(sample, count, split, is_held_out)

  def verify(self, problem: Problem, response: str) -> Verdict:
    """1 when the answer is a valid expression over the given numbers (each at most once) whose
    value is the target, else 0 with the reason. "expr = target" is accepted."""
    numbers, target = field(problem, "numbers"), field(problem, "target")
    parsed = parse_response(response)
    answer = parsed.answer if parsed.well_formed else parsed.answer.rpartition(THINK_CLOSE)[2]
    answer = answer.strip().rstrip(".")
    if "=" in answer:
      answer = answer.split("=", 1)[0]
    if not answer.strip():
      return Verdict(0.0, "no answer")
    try:
      value, used = evaluate(answer)
    except ExpressionError as e:
      return Verdict(0.0, f"invalid expression: {e}")
    extra = collections.Counter(used) - collections.Counter(numbers)
    if extra:
      return Verdict(0.0, f"uses {sorted(extra.elements())} more often than given {numbers}")
    if value != target:
      return Verdict(0.0, f"evaluates to {value}, not {target}")
    return Verdict(1.0, f"reaches {target}")

  def step_score(self, problem: Problem, response: str) -> float:
    """The fraction of the puzzle's combinations (one fewer than its numbers) that the response's
    reasoning carries out as legal moves before its first illegal one (`step_credit`)."""
    return sum(credit for _, credit in self.step_credit(problem, response))

  def step_credit(self, problem: Problem, response: str) -> list[tuple[int, float]]:
    """`step_score` step by step: one (end, credit) per combination the puzzle needs, `end` the
    character offset where the reasoning's k-th shown step "a op b = c" ends (the end of the
    response's text when fewer are shown) and `credit` 1 / combinations when it and every step
    before it are legal moves: the equation true, and a and b both among the values still at
    hand (given numbers not yet used, results of earlier steps not yet used). The credit is for
    legal moves, not for progress: reaching the target is the answer's accuracy. A solution that
    combines fewer numbers earns fewer credits, a retry after an illegal step none, and steps
    with "/" are not read as steps (the reference chains use + - * only)."""
    numbers = field(problem, "numbers")
    combinations = len(numbers) - 1
    shown, text_end = reasoning_steps(response)
    at_hand, right, credits = collections.Counter(numbers), True, []
    for k in range(combinations):
      if k >= len(shown):
        credits.append((text_end, 0.0))
        continue
      end, (a, op, b, c) = shown[k]
      operands = collections.Counter((a, b))
      right = right and OPS[op](a, b) == c and not operands - at_hand
      if right:
        at_hand = at_hand - operands + collections.Counter((c,))
      credits.append((end, 1.0 / combinations if right else 0.0))
    return credits
