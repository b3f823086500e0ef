"""Program writing: a Python function from its signature and examples, checked by hidden tests.

Problems are generated here; checking them means running untrusted code, which only the sandbox
(posttrain/sandbox.py, the RL issue) may do. Until it exists `verify` raises SandboxUnavailable:
it never executes model text in this process and never returns a made-up score.
"""

from __future__ import annotations

import dataclasses
import random

from posttrain.chat import assistant_content
from posttrain.tasks.base import Problem, Verdict, distinct
from train.corpus import FUNCTIONS, is_held_out


class SandboxUnavailable(RuntimeError):
  """Program answers cannot be checked: there is no sandbox to run them in."""


@dataclasses.dataclass(frozen=True)
class Program:
  """Functions from train.corpus.FUNCTIONS with `shown` example asserts and `hidden` tests."""

  shown: int = 2
  hidden: int = 5
  name: str = "program"

  def make(self, r: random.Random) -> Problem:
    """A random function's problem: signature, shown examples, hidden tests."""
    name, args, body, sample, fn = r.choice(FUNCTIONS)
    asserts = []
    for _ in range(self.shown + self.hidden):
      inputs = sample(r)
      asserts.append(f"assert {name}({', '.join(map(repr, inputs))}) == {fn(*inputs)!r}")
    shown, hidden = asserts[:self.shown], asserts[self.shown:]
    code = f"def {name}({args}):\n    {body}\n"
    return Problem(task=self.name, key=f"program:{name}:{asserts}",
                   prompt=f"Write a Python function {name}({args}) such that:\n" + "\n".join(shown),
                   answer=code,
                   solution=assistant_content(f"The examples fit: {body}.", code),
                   fields=dict(tests=hidden))

  def problems(self, split: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of `split`, deterministic in `seed`."""
    r = random.Random(f"program:{seed}:{split}")
    return distinct(lambda: self.make(r), count, split, is_held_out)

  def verify(self, problem: Problem, response: str) -> Verdict:
    """Raises SandboxUnavailable: running the hidden tests needs posttrain/sandbox.py."""
    raise SandboxUnavailable(
        "program answers are checked by running their hidden tests in posttrain/sandbox.py, "
        "which does not exist yet (the RL issue builds it); no score is given without it")
