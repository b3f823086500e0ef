"""Task families, verifiers, the countdown parser and the math answer checker."""

import collections
import json
import re
import threading
import time

import pytest

from posttrain.tasks import get_task
from posttrain.tasks.program import extract_code
from posttrain.tasks.expression import ExpressionError, evaluate
from posttrain.tasks.math import answers_match, extract_answer
from train import corpus

FAMILIES = ("arithmetic", "countdown", "program")


@pytest.mark.parametrize("name", FAMILIES)
def test_splits_are_disjoint_deterministic_and_kept_out_of_the_corpus(name):
  task = get_task(name)
  train, test = task.problems("train", 300), task.problems("test", 100)
  assert len({p.key for p in train}) == 300 and len({p.key for p in test}) == 100
  assert not {p.key for p in train} & {p.key for p in test}
  assert all(corpus.is_held_out(p.key) for p in test)
  assert [p.key for p in task.problems("test", 100)] == [p.key for p in test]
  assert [p.key for p in task.problems("test", 100, seed=1)] != [p.key for p in test]
  held_out = {p.prompt.removeprefix("Compute ").rstrip(".") for p in test}
  for i in range(300):  # No held-out calculation appears in the pre-training corpus.
    for line in corpus.document(0, i).splitlines():
      if line.startswith("Compute "):
        assert line.split(". Step")[0].removeprefix("Compute ") not in held_out


def test_task_defaults_follow_the_corpus_sizing():
  """The default problems are sized like the corpus's worked calculations and countdown lines
  (what pre-training taught): step counts, operand ranges and number counts."""
  for p in get_task("arithmetic").problems("test", 200):
    steps = p.solution.count("Step ")
    assert steps == p.difficulty and corpus.CALC_STEPS[0] <= steps <= corpus.CALC_STEPS[1]
    for a, op, b in re.findall(r"(-?\d+) ([-+*]) (\d+) =", p.solution):
      assert 2 <= int(b) <= corpus.MUL_MAX if op == "*" else 1 <= int(b) <= corpus.OPERAND_MAX
  sizes = collections.Counter()
  for p in get_task("countdown").problems("test", 200):
    numbers = p.fields["numbers"]
    sizes[len(numbers)] += 1
    assert all(1 <= x <= corpus.COUNTDOWN_MAX for x in numbers)
  assert set(sizes) == set(range(corpus.COUNTDOWN_NUMBERS[0], corpus.COUNTDOWN_NUMBERS[1] + 1))


def test_arithmetic_verifier_right_wrong_malformed():
  task = get_task("arithmetic")
  p = task.make(3, [("+", 4), ("*", 2)])
  assert p.prompt == "Compute (3 + 4) * 2." and p.answer == "14" and p.difficulty == 2
  assert p.solution == "<think>Step 1: 3 + 4 = 7. Step 2: 7 * 2 = 14.</think>14"
  assert task.verify(p, p.solution).correct
  assert task.verify(p, "<think>x</think>14.0").correct
  assert task.verify(p, "Step 1: 3 + 4 = 7. Answer: 14.").correct  # Malformed but answered.
  assert task.verify(p, "<think>Step 1: 3 + 4 = 7.</think>15").score == 0
  assert task.verify(p, "fourteen").reason == "no final answer"
  assert task.verify(p, "").score == 0
  for answer in ("\\boxed{14}", "x = 14", "$14$", "28/2", "14."):
    assert task.verify(p, f"<think>r</think>{answer}").correct, answer
  # The question restated is not an answer (math-verify alone would find it equal to 14).
  for answer in ("(3 + 4) * 2", "7 * 2", "\\boxed{(3 + 4) * 2}", "2 \\cdot 7"):
    verdict = task.verify(p, f"<think>Step 1: 3 + 4 = 7.</think>{answer}")
    assert verdict.score == 0 and verdict.reason.startswith("not a number"), answer


def test_countdown_verifier():
  task = get_task("countdown")
  p = task.make([7, 9, 5, 4], ["+", "-", "*"])
  assert p.prompt == "Using 7, 9, 5, 4 make 44." and p.fields["target"] == 44
  assert task.verify(p, p.solution).correct
  ok = ["<think>a</think>(9 + 7 - 5) * 4", "<think>a</think>4 * (9 - 5 + 7) = 44"]
  assert all(task.verify(p, r).correct for r in ok)
  cases = {"(9 + 9 - 5) * 4": "more often", "(7 + 9) * 4": "not 44", "44": "more often",
           "4 / (5 - 5)": "division by zero", "10^1000": "powers", "10**1000": "powers",
           "7 ** 2": "powers", "x + 7": "names", "__import__('os')": "names",
           "(7).real + 9": "decimals or attributes", "abs(7) * 4": "names", "": "no answer",
           "1" * 300: "longer than", "(7 + 9": "ends too early", "-4 + 48": "unary",
           "1000000000 - 999999956": "digits", "7 + 9 5": "after a complete"}
  for answer, reason in cases.items():
    verdict = task.verify(p, f"<think>r</think>{answer}")
    assert verdict.score == 0 and reason in verdict.reason, (answer, verdict)


def test_expression_parser_values_and_precedence():
  assert evaluate("2 + 3 * 4") == (14, [2, 3, 4])
  assert evaluate("(2 + 3) * 4")[0] == 20
  assert evaluate("8 / 3 * 3")[0] == 8  # Exact fractions.
  assert evaluate("10 - 4 - 3")[0] == 3  # Left associative.
  with pytest.raises(ExpressionError, match="deeper"):
    evaluate("(" * 40 + "1" + ")" * 40)


def test_program_problems_and_code_extraction():
  task = get_task("program")
  p = task.problems("test", 1)[0]
  assert "assert" in p.prompt and len(p.fields["tests"]) == 5
  assert not set(p.fields["tests"]) & set(p.prompt.splitlines())  # Hidden tests are not shown.
  assert extract_code(p.solution).strip() == p.answer.strip()
  assert extract_code("<think>x</think>Here:\n```python\ndef f():\n  return 1\n```\nDone.") == \
      "def f():\n  return 1\n"
  assert extract_code("def g(): pass<|end|>junk") == "def g(): pass"


EQUIVALENT = [
    ("14", "14"), ("14.0", "14"), ("1,234", "1234"), ("$5$", "5"), ("x = 5", "5"), ("3/4", "0.75"),
    ("\\frac{3}{4}", "0.75"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\sqrt{4}", "2"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\pi", "\\pi"), ("2^{10}", "1024"), ("(1, 2)", "(1,2)"),
    ("-7", "-7"), ("0.5", ".5"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"), ("1000000", "1,000,000"),
    ("\\left(3, 4\\right)", "(3,4)"), ("x^2+2x+1", "(x+1)^2"), ("10\\%", "10\\%"), ("5.", "5"),
]
NOT_EQUIVALENT = [
    ("13", "14"), ("14.5", "14"), ("1,235", "1234"), ("\\frac{1}{3}", "0.33"), ("\\sqrt{3}", "2"),
    ("(1, 2)", "(2, 1)"), ("-7", "7"), ("2^{10}", "1000"), ("\\pi", "3.14"), ("x+1", "x-1"),
    ("", "5"), ("five", "5"),
]


@pytest.mark.parametrize("predicted,reference", EQUIVALENT)
def test_answers_match_equivalences(predicted, reference):
  assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted,reference", NOT_EQUIVALENT)
def test_answers_match_non_equivalences(predicted, reference):
  assert not answers_match(predicted, reference)


def test_answers_match_bounded_off_the_main_thread_and_never_raises():
  results = []
  worker = threading.Thread(target=lambda: results.append(
      [answers_match("\\frac{1}{2}", "0.5"), answers_match("9" * 5000, "1"),
       answers_match("{{{{\\frac{", "}}"), answers_match(None, "1"),
       answers_match("((((" * 200, "1", timeout=2.0)]))
  start = time.perf_counter()
  worker.start()
  worker.join(30)
  assert results == [[True, False, False, False, False]]
  assert time.perf_counter() - start < 30


def test_extract_answer():
  assert extract_answer("so \\boxed{\\frac{1}{2}} then \\boxed{3}") == "3"
  assert extract_answer("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
  assert extract_answer("steps\n#### 1,234") == "1,234"
  assert extract_answer("Step 1: 3 + 4 = 7. Answer: 7.") == "7"
  assert extract_answer("\\boxed{2} and #### 3") == "2"  # boxed first.
  assert extract_answer("no answer here") is None and extract_answer("\\boxed{unclosed") is None


def test_gsm8k_and_math_loaders(tmp_path):
  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text(json.dumps({"question": "Tom has 3 apples and buys 4. How many?",
                             "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}) + "\n\n")
  task = get_task("gsm8k", data=str(gsm))
  (p,) = task.problems("test", 0)
  assert p.answer == "7" and p.solution == "<think>3 + 4 = 7</think>7"
  assert task.verify(p, "<think>...</think>7").correct and not task.verify(p, "#### 8").correct
  assert task.verify(p, "#### 7.0").correct and not task.verify(p, "#### 3 + 4").correct
  math = tmp_path / "math.jsonl"
  math.write_text(json.dumps({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac12}$.",
                              "level": "Level 2"}) + "\n")
  (q,) = get_task("math", data=str(math)).problems("test", 5)
  assert q.answer == "\\frac12" and q.difficulty == 2
  assert get_task("math", data=str(math)).verify(q, "The answer is \\boxed{0.5}").correct
  assert get_task("math", data=str(math)).verify(q, "\\boxed{\\frac{2}{4}}").correct  # Symbolic.
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
    get_task("gsm8k", data=str(bad)).problems("test", 1)
  bad.write_text(json.dumps({"question": "q"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer' is missing"):
    get_task("gsm8k", data=str(bad)).problems("test", 1)
  bad.write_text(json.dumps({"question": "q", "answer": "no hashes"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer' does not end"):
    get_task("gsm8k", data=str(bad)).problems("test", 1)
  with pytest.raises(ValueError, match="needs a JSONL file"):
    get_task("gsm8k")
  with pytest.raises(ValueError, match="unknown task"):
    get_task("chess")
