"""Math answers: extraction from a response and equivalence checking.

`extract_answer` takes the last `\\boxed{...}`, else the last `#### N`, else the last
"Answer: N". `answers_match` first compares plain numbers exactly (integers, decimals, fractions,
thousands separators, "x = 5", dollar signs) and falls back to the `math-verify` library for
LaTeX (`\\frac`, `\\sqrt`, `\\pi`, powers, tuples...). The library runs without its signal-based
timeouts (they fail off the main thread) in a daemon thread joined with a time limit, so huge or
malformed input returns False in bounded time from any thread and never raises.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

MAX_ANSWER_CHARS = 1000  # Longer answers are not parsed: they are not a final answer.
TIMEOUT_SECONDS = 5.0

logging.getLogger("math_verify").setLevel(logging.ERROR)  # Its "timeout disabled" warning.

_HASHES_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_RE = re.compile(r"[Aa]nswer\s*(?::|=|\bis\b:?)\s*([^\n]+)")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z]\w*\s*=\s*(?!=)")


def _last_boxed(text: str) -> str | None:
  """The contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none."""
  start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
  if start < 0:
    return None
  i = text.index("{", start) + 1
  depth, begin = 1, i
  while i < len(text):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[begin:i].strip()
    i += 1
  return None  # Unbalanced.


def extract_answer(text: str) -> str | None:
  """The final answer stated in `text`: the last `\\boxed{}`, else the last `#### N`, else the last
  "Answer: N" (a trailing full stop dropped); None when there is none."""
  if not isinstance(text, str):
    return None
  boxed = _last_boxed(text)
  if boxed is not None:
    return boxed
  for pattern in (_HASHES_RE, _ANSWER_RE):
    found = pattern.findall(text)
    if found:
      answer = found[-1].strip().rstrip(".").strip()
      return answer or None
  return None


def normalize(answer: str) -> str:
  """Strips what does not change a final answer: dollar signs, `\\!`, `\\left`/`\\right`, a
  leading "x =", a trailing full stop, surrounding spaces and thousands separators."""
  s = answer.strip().strip("$").strip()
  s = s.replace("\\!", "").replace("\\left", "").replace("\\right", "").replace("\\,", "")
  s = _ASSIGNMENT_RE.sub("", s).strip().rstrip(".").strip()
  if _THOUSANDS_RE.match(s):
    s = s.replace(",", "")
  return s


def as_number(answer: str) -> Fraction | None:
  """`answer` (normalised) as an exact number: an integer, decimal or a/b; None otherwise."""
  s = normalize(answer).replace(" ", "")
  if _NUMBER_RE.match(s):
    return Fraction(s)
  parts = s.split("/")
  if len(parts) == 2 and all(re.match(r"^[+-]?\d+$", p) for p in parts) and int(parts[1]) != 0:
    return Fraction(int(parts[0]), int(parts[1]))
  return None


def _math_verify(predicted: str, reference: str) -> bool:
  from math_verify import parse, verify  # Imported lazily: sympy takes a second to import.
  gold = parse(f"${reference}$", parsing_timeout=None)
  pred = parse(f"${predicted}$", parsing_timeout=None)
  return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


def answers_match(predicted: str | None, reference: str | None,
                  timeout: float = TIMEOUT_SECONDS) -> bool:
  """Whether `predicted` states the same mathematical answer as `reference`. Never raises:
  malformed, overlong or too-slow input is False (within about `timeout` seconds)."""
  if not isinstance(predicted, str) or not isinstance(reference, str):
    return False
  if not predicted.strip() or len(predicted) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
    return False
  try:
    a, b = as_number(predicted), as_number(reference)
    if a is not None and b is not None:
      return a == b
    p, r = normalize(predicted), normalize(reference)
    if p == r:
      return True
  except (ValueError, ZeroDivisionError, OverflowError):
    return False
  result = []

  def target():
    try:
      result.append(_math_verify(p, r))
    except BaseException:  # The library's own failures mean "not shown equal".
      result.append(False)
  worker = threading.Thread(target=target, daemon=True, name="answers_match")
  worker.start()
  worker.join(timeout)
  return bool(result and result[0])
