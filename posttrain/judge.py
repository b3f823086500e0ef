"""The built-in judge: a chat model fine-tuned to answer AI feedback's question (which of two
responses, A or B, follows a principle better) on examples that rules label.

  python -m posttrain.judge data --policy=workdir/demo/sft --out=W/judge.jsonl [--hold_out=concise]
  python -m posttrain.sft --config=configs/sft.py:judge --workdir=W/judge \
      --config.init_from=workdir/demo/sft --config.data.paths=W/judge.jsonl
  python -m posttrain.judge agreement --judge=W/judge --policy=workdir/demo/sft

A tiny model cannot judge by being asked, so it is taught: the built-in constitution's principles
(posttrain.ai_feedback.DEFAULT_CONSTITUTION) are all rule-checkable on the arithmetic and countdown
families (`rule_scores`), and a pair of responses is labelled under a principle by whichever scores
higher (a tie teaches nothing and is skipped). The pairs are a problem's worked solution against a
worse variant of it (posttrain.preferences.rejected_variant: wrong, malformed, rambling,
unexplained) and, with a policy, two of the policy's own samples, the pairs the judge later labels.
Every example is written in both orders. One principle can be held out of training
(`--hold_out`); `agreement` then measures, on held-out problems, how often the judge's
order-averaged label picks the rule's choice, for every principle, the held-out one included.

This judge is a stand-in for a strong one: it has learned these four rules, not judgement. The
AI-feedback command takes any checkpoint as its judge.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from posttrain.ai_feedback import DEFAULT_CONSTITUTION, both_orders, judge_fits, sample_pairs
from posttrain.ai_feedback import soft_labels
from posttrain.chat import parse_response
from posttrain.preferences import REJECTED_KINDS, rejected_variant
from posttrain.tasks import get_task, task_names
from posttrain.tasks.arithmetic import shown_steps

# The built-in principles by short name, in DEFAULT_CONSTITUTION's order.
PRINCIPLES = dict(zip(("correct", "steps", "concise", "format"), DEFAULT_CONSTITUTION))


def repeated_tail(steps: list) -> int:
  """The length of the longest run of steps that ends the list right after an identical run:
  reasoning said twice over (3 for [a, b, c, a, b, c]); a step that merely recurs, as in
  [a, b, a], is no repeat."""
  return max((k for k in range(1, len(steps) // 2 + 1) if steps[-k:] == steps[-2 * k:-k]),
             default=0)


def rule_scores(task, problem, text: str) -> dict[str, float]:
  """How well `text` follows each built-in principle, higher is better: correct (the verifier's
  score), steps (1 when at least one worked step "a op b = c" is shown), concise (minus the
  steps repeated at the end of the reasoning, `repeated_tail`), format (1 when
  `<think>reasoning</think>answer`). The step rules read the arithmetic and countdown families'
  steps; other families score 0 on both."""
  steps = shown_steps(text)
  return dict(correct=float(task.verify(problem, text).score),
              steps=1.0 if steps else 0.0,
              concise=-float(repeated_tail(steps)),
              format=1.0 if parse_response(text).well_formed else 0.0)


@dataclasses.dataclass(frozen=True)
class JudgedPair:
  """Two responses to one problem and each principle's rule verdict: +1 when `first` follows it
  better, -1 when `second` does, 0 on a tie."""

  prompt: str
  first: str
  second: str
  verdicts: dict  # Principle name -> +1, -1 or 0.
  source: str  # "variant:KIND" or "policy".


def judged_pair(task, problem, first: str, second: str, source: str) -> JudgedPair:
  """The rule verdicts of one pair (see JudgedPair)."""
  a, b = rule_scores(task, problem, first), rule_scores(task, problem, second)
  verdicts = {name: int(np.sign(a[name] - b[name])) for name in PRINCIPLES}
  return JudgedPair(problem.prompt, first, second, verdicts, source)


def judged_pairs(tasks: str, split: str, count: int, seed: int = 0, policy=None,
                 tokenizer=None, temperature: float = 1.0,
                 max_new_tokens: int = 64) -> list[JudgedPair]:
  """For `count` problems of each family in `split`: the worked solution against a variant of each
  rejected kind (the solution first in even problems, second in odd ones) and, with `policy`, two
  of its samples."""
  rng = np.random.default_rng([seed, 13])
  pairs = []
  for name in task_names(tasks):
    task = get_task(name)
    problems = task.problems(split, count, seed)
    for i, problem in enumerate(problems):
      for kind in REJECTED_KINDS:
        worse = rejected_variant(task, problem, kind, rng)
        if worse is not None:
          a, b = (problem.solution, worse) if i % 2 == 0 else (worse, problem.solution)
          pairs.append(judged_pair(task, problem, a, b, f"variant:{kind}"))
    if policy is not None:
      first, second = sample_pairs(policy, tokenizer, [p.prompt for p in problems], seed,
                                   temperature, max_new_tokens)
      pairs += [judged_pair(task, p, a, b, "policy") for p, a, b in zip(problems, first, second)]
  return pairs


def judging_chats(pairs: list[JudgedPair], principles: list[str]) -> list[dict]:
  """Training records for the judge: for each pair and each named principle the rule decides, the
  judge question in both orders with the rule's answer ("A" or "B") as the assistant turn.
  Records are {"messages", "principle", "source"}."""
  records = []
  for pair in pairs:
    for name in principles:
      verdict = pair.verdicts[name]
      if verdict == 0:
        continue
      questions = both_orders(PRINCIPLES[name], pair.prompt, pair.first, pair.second)
      for question, answer in zip(questions, ("A", "B") if verdict > 0 else ("B", "A")):
        records.append(dict(messages=[{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}],
                            principle=name, source=pair.source))
  return records


def agreement(judge, tokenizer, pairs: list[JudgedPair], principles: list[str]) -> dict:
  """How often the judge's order-averaged label (ai_feedback.soft_labels) picks the rule's choice,
  per principle, over the pairs the rule decides and whose questions fit the judge's context (a
  label of exactly 0.5, no preference, counts half): {principle: {"pairs", "agreement",
  "by_source": {source: agreement}}}."""
  out = {}
  for name in principles:
    decided = [p for p in pairs if p.verdicts[name] != 0 and all(
        judge_fits(judge, tokenizer, q)
        for q in both_orders(PRINCIPLES[name], p.prompt, p.first, p.second))]
    if not decided:
      out[name] = dict(pairs=0, agreement=None, by_source={})
      continue
    labels = soft_labels(judge, tokenizer, [p.prompt for p in decided],
                         [p.first for p in decided], [p.second for p in decided],
                         [[PRINCIPLES[name]]] * len(decided))
    first_better = np.array([p.verdicts[name] > 0 for p in decided])
    agree = np.where(labels == 0.5, 0.5, ((labels > 0.5) == first_better).astype(float))
    sources = sorted({p.source for p in decided})
    out[name] = dict(pairs=len(decided), agreement=float(agree.mean()), by_source={
        s: float(agree[[p.source == s for p in decided]].mean()) for s in sources})
  return out


def principle_names(text: str) -> list[str]:
  """The built-in principle names of a comma-separated list; ValueError naming an unknown one."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in PRINCIPLES]
  if unknown:
    raise ValueError(f"unknown principle {unknown[0]!r}; known: {', '.join(PRINCIPLES)}")
  return names


def main(argv):
  from posttrain.start import load_chat_model
  from train.checkpoint import write_atomically
  from train.metrics import quiet_logging
  quiet_logging()
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ("data", "agreement"):
    raise app.UsageError("usage: python -m posttrain.judge data|agreement --flags")
  held_out = principle_names(f.hold_out)
  policy, tokenizer = load_chat_model(f.policy) if f.policy else (None, None)
  if argv[1] == "data":
    if not f.out:
      raise app.UsageError("data needs --out")
    trained = [n for n in PRINCIPLES if n not in held_out]
    pairs = judged_pairs(f.tasks, "train", f.problems, f.seed, policy, tokenizer)
    records = judging_chats(pairs, trained)
    write_atomically(f.out, "".join(json.dumps(r) + "\n" for r in records))
    counts = {n: sum(r["principle"] == n for r in records) for n in trained}
    print(f"{len(records)} judging examples from {len(pairs)} pairs -> {f.out}; per principle "
          f"{counts}; held out: {', '.join(held_out) or 'none'}", flush=True)
    return
  if not f.judge:
    raise app.UsageError("agreement needs --judge")
  judge, judge_tokenizer = load_chat_model(f.judge)
  pairs = judged_pairs(f.tasks, "test", f.problems, f.seed, policy, tokenizer)
  result = agreement(judge, judge_tokenizer, pairs, list(PRINCIPLES))
  for name, r in result.items():
    r["held_out"] = name in held_out
    print(f"{name:8s} {'(held out) ' if r['held_out'] else ''}agreement "
          f"{r['agreement'] if r['agreement'] is None else round(r['agreement'], 3)} over "
          f"{r['pairs']} pairs; by source " + json.dumps(
              {k: round(v, 3) for k, v in r["by_source"].items()}), flush=True)
  if f.out:
    write_atomically(f.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("policy", "", "Chat checkpoint whose samples add pairs (data: to train on; "
                      "agreement: to measure on); empty: the variant pairs only.")
  flags.DEFINE_string("judge", "", "agreement: the judge checkpoint.")
  flags.DEFINE_string("out", "", "data: the judging JSONL to write; agreement: optional JSON.")
  flags.DEFINE_string("hold_out", "concise", "Principles left out of the judging data.")
  flags.DEFINE_string("tasks", "arithmetic,countdown", "Task families of the pairs.")
  flags.DEFINE_integer("problems", 600, "Problems per family (data: train split; agreement: "
                       "held-out split).")
  flags.DEFINE_integer("seed", 0, "Problem, variant and sampling seed.")
  app.run(main)
