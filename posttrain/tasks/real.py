"""Loaders for real math data: GSM8K-style and MATH-style JSONL, as task families.

  GSM8K: {"question": ..., "answer": "...reasoning...\\n#### 72"}
  MATH:  {"problem": ..., "solution": "... \\boxed{\\frac{1}{2}} ...", "level": "Level 3"}

Errors name the file and line at fault. Both are verified with `math.answers_match` on the answer
the response states (`\\boxed{}`, `#### N` or "Answer: N", or the answer after `</think>`).
"""

from __future__ import annotations

import dataclasses
import random
import re

from posttrain.chat import assistant_content
from train.data import read_jsonl
from posttrain.tasks.arithmetic import verify_stated_answer
from posttrain.tasks.base import Problem, Verdict, check_split
from posttrain.tasks.math import extract_answer


def gsm8k_problem(record: dict, where: str) -> Problem:
  """A GSM8K record as a Problem; the reasoning is the text before `#### N`."""
  reasoning, sep, answer = record["answer"].rpartition("####")
  answer = answer.strip().replace(",", "")
  if not sep or not answer:
    raise ValueError(f"{where}: field 'answer' does not end in '#### N'")
  reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # GSM8K's calculator annotations.
  return Problem(task="gsm8k", key=f"gsm8k:{record['question']}", prompt=record["question"].strip(),
                 answer=answer, solution=assistant_content(reasoning, answer),
                 difficulty=len([l for l in reasoning.splitlines() if l.strip()]))


def math_problem(record: dict, where: str) -> Problem:
  """A MATH record as a Problem; the answer is the solution's last `\\boxed{}`."""
  answer = extract_answer(record["solution"]) if "\\boxed" in record["solution"] else None
  if not answer:
    raise ValueError(f"{where}: field 'solution' has no \\boxed{{}} answer")
  level = re.search(r"\d+", str(record.get("level", "")))
  return Problem(task="math", key=f"math:{record['problem']}", prompt=record["problem"].strip(),
                 answer=answer, solution=assistant_content(record["solution"].strip(), answer),
                 difficulty=int(level.group()) if level else 0)


_FORMATS = {"gsm8k": (("question", "answer"), gsm8k_problem),
            "math": (("problem", "solution"), math_problem)}


@dataclasses.dataclass(frozen=True)
class MathData:
  """A file of GSM8K- or MATH-style problems. The file is one split: `problems` serves it for
  whichever split is asked (the caller chooses a train or a test file)."""

  path: str
  format: str = "gsm8k"

  @property
  def name(self) -> str:
    return self.format

  def __post_init__(self):
    if self.format not in _FORMATS:
      raise ValueError(f"unknown math data format {self.format!r}; known: {sorted(_FORMATS)}")

  def load(self) -> list[Problem]:
    """Every problem of the file, in file order."""
    required, convert = _FORMATS[self.format]
    return [convert(r, f"{self.path}:{n}") for n, r in read_jsonl(self.path, required)]

  def problems(self, split: str, count: int, seed: int = 0) -> list[Problem]:
    """The first `count` problems after a seeded shuffle (all of them if count <= 0)."""
    check_split(split)
    problems = self.load()
    random.Random(f"{self.format}:{seed}").shuffle(problems)
    return problems[:count] if count > 0 else problems

  def verify(self, problem: Problem, response: str) -> Verdict:
    """1 when the stated final answer is mathematically equal to the reference, else 0. A
    GSM8K answer must be a number (as its `#### N` is), a MATH answer may be any expression."""
    return verify_stated_answer(problem, response, numeric=self.format == "gsm8k")
