"""Program writing: a Python function from its signature and examples, checked by hidden tests.

A response's answer (the text after `</think>`, a Markdown code fence removed) runs with the
problem's hidden asserts in posttrain/sandbox.py, never in this process. The score is the fraction
of asserts that pass (`partial_credit`) or 1 only when all pass. Where the sandbox cannot run,
`verify` raises sandbox.SandboxUnavailable: no score is ever made up.

The harness reads a per-run random token from stdin before the answer's code runs and prints it
with the counts, so text the program prints cannot pose as a result. The answer runs in the same
interpreter as the harness: a program written to subvert its own harness could still fake a
pass; the sandbox contains it, but the score is only as honest as that.
"""

from __future__ import annotations

import dataclasses
import json
import random
import secrets

from posttrain import sandbox
from posttrain.chat import assistant_content, fenced_code, parse_response
from posttrain.tasks.base import Problem, Verdict, distinct, field
from train.corpus import FUNCTIONS, is_held_out

HARNESS = r"""import json, os, sys
_token = sys.stdin.readline().strip()
_job = json.loads(sys.stdin.read())
_out = os.dup(1)
_passed, _error = 0, ""
_scope = {"__name__": "solution"}
try:
    exec(compile(_job["code"], "solution.py", "exec"), _scope)
except BaseException as e:
    _error = "solution: " + type(e).__name__ + ": " + str(e)[:200]
else:
    for _test in _job["tests"]:
        try:
            exec(compile(_test, "test.py", "exec"), _scope)
            _passed += 1
        except BaseException as e:
            _error = _error or ("test: " + type(e).__name__ + ": " + str(e)[:200])
os.write(_out, ("\n" + json.dumps([_token, _passed, len(_job["tests"]), _error]) + "\n").encode())
"""


def extract_code(response: str) -> str:
  """The code of a response: its answer after `</think>` (the whole text when not well formed),
  the first fenced block's content when there is one."""
  parsed = parse_response(response)
  text = parsed.answer if parsed.well_formed else response.split("<|end|>", 1)[0]
  fenced = fenced_code(text)
  return text if fenced is None else fenced


@dataclasses.dataclass(frozen=True)
class Program:
  """Functions from train.corpus.FUNCTIONS with `shown` example asserts and `hidden` tests."""

  shown: int = 2
  hidden: int = 5
  partial_credit: bool = False  # Score the fraction of hidden tests passed, not all-or-nothing.
  timeout_s: float = 5.0  # Sandbox limits per response.
  memory_mb: int = 256
  isolation: str = "namespaces"  # "rlimits" accepts rlimits-only isolation (posttrain/sandbox.py).
  workers: int = 0  # Programs run at once; 0: the CPU count.
  name: str = "program"

  def make(self, r: random.Random) -> Problem:
    """A random function's problem: signature, shown examples, hidden tests."""
    name, args, body, sample, fn = r.choice(FUNCTIONS)
    asserts = []  # Distinct: a hidden test never repeats a shown example.
    for _ in range(100 * (self.shown + self.hidden)):
      inputs = sample(r)
      test = f"assert {name}({', '.join(map(repr, inputs))}) == {fn(*inputs)!r}"
      if test not in asserts:
        asserts.append(test)
      if len(asserts) == self.shown + self.hidden:
        break
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
    """Runs the response's code with the hidden tests in the sandbox."""
    return self.verify_many([problem], [response])[0]

  def verify_many(self, problems: list[Problem], responses: list[str]) -> list[Verdict]:
    """verify() over many responses, run by the sandbox's worker pool."""
    tokens = [secrets.token_hex(16) for _ in problems]
    stdins = [f"{t}\n" + json.dumps(dict(code=extract_code(r), tests=list(field(p, "tests"))))
              for t, p, r in zip(tokens, problems, responses)]
    results = sandbox.run_many([HARNESS] * len(problems), stdins=stdins,
                               isolation=self.isolation, timeout_s=self.timeout_s,
                               memory_mb=self.memory_mb, workers=self.workers or None)
    return [self._verdict(token, result) for token, result in zip(tokens, results)]

  def _verdict(self, token: str, result: sandbox.SandboxResult) -> Verdict:
    for line in reversed(result.stdout.splitlines()):
      try:
        got, passed, total, error = json.loads(line)
      except (ValueError, TypeError):
        continue
      if got == token:
        score = passed / total if self.partial_credit else float(passed == total)
        return Verdict(score, f"{passed}/{total} hidden tests pass" + (f" ({error})" if error else ""))
    return Verdict(0.0, f"no result: the program ended with status {result.status}")
