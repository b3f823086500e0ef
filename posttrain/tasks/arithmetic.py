"""Multi-step arithmetic: "Compute (3 + 4) * 2." solved one operation per step.

The same problems the built-in corpus teaches (train.corpus), split by the corpus's own held-out
hash, so no test problem ever appears in pre-training or SFT data. Knobs: the number of steps and
the size of the operands.
"""

from __future__ import annotations

import dataclasses
import random
import re

from posttrain.chat import END, THINK_CLOSE, THINK_OPEN, assistant_content, parse_response
from posttrain.tasks.base import Problem, Verdict, distinct, field
from posttrain.tasks.math import answers_match, as_number, extract_answer
from train import corpus
from train.corpus import OPS, calculation_key, calculation_steps, is_held_out, random_chain


# One shown step of a calculation, "a op b = c" on integers (any of them may be negative).
_STEP = re.compile(r"(?<![\w.])(-?\d+) ([-+*]) (-?\d+) = (-?\d+)(?![\w.]*\d)")


def _steps_between(text: str, first: int, last: int) -> list[tuple[int, tuple[int, str, int, int]]]:
  """(end offset, (a, op, b, c)) of each step "a op b = c" in text[first:last], in order."""
  return [(m.end(), (int(m[1]), m[2], int(m[3]), int(m[4])))
          for m in _STEP.finditer(text, first, last)]


def shown_steps(text: str) -> list[tuple[int, str, int, int]]:
  """The steps "a op b = c" (op one of + - *) that `text` states, in order."""
  return [step for _, step in _steps_between(text, 0, len(text))]


def reasoning_steps(response: str) -> tuple[list[tuple[int, tuple[int, str, int, int]]], int]:
  """The steps "a op b = c" a response's reasoning shows, each with the character offset where it
  ends, and the length of the response's text before `<|end|>` (where a step not shown earns
  its zero credit). The reasoning is the `<think>` section of a well-formed response, else all
  the text before `<|end|>` (so a malformed response's steps still count)."""
  text = response.split(END, 1)[0]
  first, last = 0, len(text)
  if parse_response(text).well_formed:
    first, last = text.index(THINK_OPEN) + len(THINK_OPEN), text.index(THINK_CLOSE)
  return _steps_between(text, first, last), len(text)


def final_answer(response: str) -> str | None:
  """The answer a response states: the part after `</think>` when well formed, else an explicit
  "Answer: N" / `#### N` / `\\boxed{}` anywhere in it; None when there is none."""
  parsed = parse_response(response)
  if parsed.well_formed:
    return extract_answer(parsed.answer) or parsed.answer
  return extract_answer(parsed.answer)


def verify_stated_answer(problem: Problem, response: str, numeric: bool = False) -> Verdict:
  """1 when the response's final answer (`final_answer`) is mathematically equal to the
  problem's reference answer, else 0 with the reason.

  `numeric`: the answer must be a number (integer, decimal or a/b; `math.as_number`), as a
  computation's answer is. Without it "(3 + 4) * 2", the question restated, equals 14 under
  math-verify's symbolic comparison: GRPO found that (a policy answering every arithmetic
  problem with its own expression scored 0.87 on two-step problems)."""
  answer = final_answer(response)
  if answer is None:
    return Verdict(0.0, "no final answer")
  if numeric and as_number(answer) is None:
    return Verdict(0.0, f"not a number: {answer[:40]!r}")
  if answers_match(answer, problem.answer):
    return Verdict(1.0, f"correct: {problem.answer[:40]}")
  return Verdict(0.0, f"wrong: {answer[:40]!r}, expected {problem.answer[:40]!r}")


@dataclasses.dataclass(frozen=True)
class Arithmetic:
  """Chains of min_steps..max_steps operations on integers: + and - by 1..operand_max, * by
  2..mul_max. The defaults are the corpus's sizing."""

  min_steps: int = corpus.CALC_STEPS[0]
  max_steps: int = corpus.CALC_STEPS[1]
  start_max: int = corpus.START_MAX
  operand_max: int = corpus.OPERAND_MAX
  mul_max: int = corpus.MUL_MAX
  name: str = "arithmetic"

  def __post_init__(self):
    if not 1 <= self.min_steps <= self.max_steps:
      raise ValueError(f"arithmetic: need 1 <= min_steps <= max_steps, got {self.min_steps}, "
                       f"{self.max_steps}")

  def make(self, start: int, ops) -> Problem:
    """The problem of the chain `start` then each (op, operand) of `ops`."""
    expr, steps, value = calculation_steps(start, ops)
    reasoning = " ".join(f"Step {i}: {a} {op} {b} = {c}." for i, (a, op, b, c) in enumerate(steps, 1))
    return Problem(task=self.name, key=calculation_key(expr), prompt=f"Compute {expr}.",
                   answer=str(value), solution=assistant_content(reasoning, str(value)),
                   difficulty=len(ops),
                   fields=dict(start=start, ops=[[op, operand] for op, operand in ops]))

  def problems(self, split: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of `split`, deterministic in `seed`."""
    r = random.Random(f"arithmetic:{seed}:{split}")

    def sample():
      steps = r.randint(self.min_steps, self.max_steps)
      return self.make(*random_chain(r, steps, self.start_max, self.operand_max, self.mul_max))
    return distinct(sample, count, split, is_held_out)

  def verify(self, problem: Problem, response: str) -> Verdict:
    """1 when the stated final answer is a number equal to the reference value, else 0."""
    return verify_stated_answer(problem, response, numeric=True)

  def step_score(self, problem: Problem, response: str) -> float:
    """The fraction of the problem's operations that the response's reasoning carries out right
    before its first mistake: its step k must read "a op b = c" with a the true result of the
    steps before (the start value for k = 1), op and b the problem's k-th operation, and c true.
    Steps after a mistake earn nothing, so true steps on a wrong value (5 - 5 = 0, then
    0 * 3 = 0 for (5 - 2) * 3) are no way around the work."""
    return sum(credit for _, credit in self.step_credit(problem, response))

  def step_credit(self, problem: Problem, response: str) -> list[tuple[int, float]]:
    """`step_score` step by step, with where each step's credit is earned: one (end, credit) per
    operation of the problem, `end` the character offset in `response` where the reasoning's
    k-th shown step ends (the response's end when fewer steps are shown) and `credit` 1 / steps
    when it and every step before it are right, else 0. The credits sum to `step_score`: the
    process reward of DeepSeekMath's process supervision, placed on the tokens that earn it."""
    ops = field(problem, "ops")
    shown, text_end = reasoning_steps(response)
    value, right, credits = field(problem, "start"), True, []
    for k, (op, operand) in enumerate(ops):
      if k >= len(shown):
        credits.append((text_end, 0.0))
        continue
      end, step = shown[k]
      result = OPS[op](value, operand)
      right = right and step == (value, op, operand, result)
      credits.append((end, 1.0 / len(ops) if right else 0.0))
      value = result
    return credits
