"""The built-in judge: its rules on hand-made responses, the judging examples (both orders, ties
and held-out principles left out), and the agreement measure against a direct computation with a
real model."""

import numpy as np
import pytest

from posttrain import ai_feedback, judge
from posttrain.chat import strip_structure
from posttrain.start import load_chat_model
from posttrain.tasks import get_task

ARITH = get_task("arithmetic")


def _problem(task, split="train", i=0):
  return task.problems(split, i + 1, 0)[i]


def test_rules_score_each_principle_by_hand():
  p = _problem(ARITH)
  ref = p.solution  # "<think>Step 1: a op b = c. ...</think>answer"
  reasoning, answer = ref[len("<think>"):].split("</think>")
  got = {
      "ref": judge.rule_scores(ARITH, p, ref),
      "wrong": judge.rule_scores(ARITH, p, f"<think>{reasoning}</think>{int(answer) + 1}"),
      "malformed": judge.rule_scores(ARITH, p, f"{reasoning} So it is {int(answer) + 1}."),
      "rambling": judge.rule_scores(ARITH, p, f"<think>{reasoning} Again: {reasoning}</think>{answer}"),
      "bare": judge.rule_scores(ARITH, p, f"<think>I know.</think>{answer}"),
  }
  steps = reasoning.count("=")
  assert got["ref"] == dict(correct=1.0, steps=1.0, concise=0.0, format=1.0)
  assert got["wrong"] == dict(correct=0.0, steps=1.0, concise=0.0, format=1.0)
  assert got["malformed"] == dict(correct=0.0, steps=1.0, concise=0.0, format=0.0)
  assert got["rambling"] == dict(correct=1.0, steps=1.0, concise=-float(steps), format=1.0)
  assert got["bare"] == dict(correct=1.0, steps=0.0, concise=0.0, format=1.0)
  countdown = get_task("countdown")
  q = _problem(countdown)
  assert judge.rule_scores(countdown, q, q.solution) == dict(correct=1.0, steps=1.0, concise=0.0,
                                                             format=1.0)


def test_a_repeat_is_reasoning_said_twice_at_the_end():
  assert judge.repeated_tail(list("abcabc")) == 3
  assert judge.repeated_tail(list("aa")) == 1
  assert judge.repeated_tail(list("aba")) == 0 and judge.repeated_tail([]) == 0
  assert judge.repeated_tail(list("xabab")) == 2


def test_judging_examples_come_in_both_orders_without_ties_or_held_out_principles():
  pairs = judge.judged_pairs("arithmetic", "train", 4, seed=0)
  assert {p.source for p in pairs} == {f"variant:{k}" for k in
                                       ("wrong", "malformed", "rambling", "unexplained")}
  by_source = {}
  for p in pairs:  # The first pair of each source: problem 0's.
    by_source.setdefault(p.source, p)
  assert by_source["variant:rambling"].verdicts == dict(  # The solution comes first in problem 0.
      correct=0, steps=0, concise=1, format=0)
  assert by_source["variant:unexplained"].verdicts["steps"] == 1
  records = judge.judging_chats(pairs, ["correct", "steps", "format"])
  assert not any(r["principle"] == "concise" for r in records)
  decided = sum(p.verdicts[n] != 0 for p in pairs for n in ("correct", "steps", "format"))
  assert len(records) == 2 * decided
  for first, second in zip(records[0::2], records[1::2]):  # The two orders of one question.
    (q1, a1), (q2, a2) = [(r["messages"][0]["content"], r["messages"][1]["content"])
                          for r in (first, second)]
    assert {a1, a2} == {"A", "B"} and first["principle"] == second["principle"]
    principle, prompt, x, y, _ = q1.split("\n")
    assert q2 == ai_feedback.judge_question(principle, prompt, y[3:], x[3:])
  pair = by_source["variant:wrong"]  # The rule's choice is the answer, in each order.
  (r1, r2), = [(a, b) for a, b in zip(records[0::2], records[1::2])
               if a["source"] == "variant:wrong" and a["principle"] == "correct"
               and strip_structure(pair.first) in a["messages"][0]["content"]][:1]
  better_first = pair.verdicts["correct"] > 0
  assert r1["messages"][1]["content"] == ("A" if better_first else "B")
  assert r2["messages"][1]["content"] == ("B" if better_first else "A")
  with pytest.raises(ValueError, match="unknown principle 'kind'"):
    judge.principle_names("correct, kind")


def test_a_longer_context_keeps_the_weights(tiny_pretrain):
  model, tok = load_chat_model(tiny_pretrain)
  longer, _ = load_chat_model(tiny_pretrain, execution=dict(max_seq_len=512))
  same, _ = load_chat_model(tiny_pretrain, execution=dict(max_seq_len=0))
  assert (longer.cfg.max_seq_len, same.cfg.max_seq_len) == (512, model.cfg.max_seq_len)
  q = [ai_feedback.judge_question("Be brief.", "Compute 2 + 3.", "5", "6")]
  np.testing.assert_allclose(ai_feedback.prefer_a(longer, tok, q), ai_feedback.prefer_a(model, tok, q),
                             rtol=1e-6)


def test_agreement_matches_a_direct_computation(tiny_pretrain):
  model, tok = load_chat_model(tiny_pretrain, execution=dict(max_seq_len=512))
  pairs = judge.judged_pairs("arithmetic", "test", 3, seed=0)
  got = judge.agreement(model, tok, pairs, ["correct", "format"])
  for name in ("correct", "format"):
    decided = [p for p in pairs if p.verdicts[name]]
    agree = []
    for p in decided:  # The label by hand: P(A) in both orders, averaged.
      a, b = strip_structure(p.first), strip_structure(p.second)
      pa = ai_feedback.prefer_a(model, tok, [
          ai_feedback.judge_question(judge.PRINCIPLES[name], p.prompt, a, b),
          ai_feedback.judge_question(judge.PRINCIPLES[name], p.prompt, b, a)])
      agree.append((0.5 * (pa[0] + 1 - pa[1]) > 0.5) == (p.verdicts[name] > 0))
    assert got[name]["pairs"] == len(decided) > 0
    assert got[name]["agreement"] == pytest.approx(np.mean(agree))
    for source, value in got[name]["by_source"].items():
      assert value == pytest.approx(np.mean([x for x, p in zip(agree, decided)
                                             if p.source == source]))
  short, _ = load_chat_model(tiny_pretrain, execution=dict(max_seq_len=32))
  assert judge.agreement(short, tok, pairs, ["format"])["format"] == dict(  # Nothing fits.
      pairs=0, agreement=None, by_source={})
