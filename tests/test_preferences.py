"""Preference pairs: record forms and errors, built-in pairs decided by the rules, encoding and
resumable batches."""

import json

import numpy as np
import pytest

from posttrain.chat import parse_response
from posttrain.preferences import (UNEXPLAINED, PairBatches, Preference, encode_pairs,
                                   read_preferences, task_preferences, write_preferences)
from posttrain.tasks import get_task
from test_chat import CharTokenizer


def _write(path, records):
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  return str(path)


def test_preference_record_forms_and_errors(tmp_path):
  user = {"role": "user", "content": "2+2?"}
  good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
  path = _write(tmp_path / "p.jsonl", [
      {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
      {"prompt": [user], "chosen": [good], "rejected": [bad], "label": 0.8, "margin": 1.5},
      {"chosen": [user, good], "rejected": [user, bad]}])  # Implicit prompt.
  pairs = read_preferences(path)
  assert [p.prompt for p in pairs] == [[user]] * 3
  assert [p.chosen for p in pairs] == [[good]] * 3 and [p.rejected for p in pairs] == [[bad]] * 3
  assert (pairs[1].label, pairs[1].margin) == (0.8, 1.5) and pairs[0].label == 1.0
  out = str(tmp_path / "again.jsonl")
  write_preferences(out, pairs)
  assert read_preferences(out) == pairs
  for record, message in [({"prompt": "x", "chosen": "a"}, ":1: a preference record needs"),
                          ({"prompt": "x", "chosen": "a", "rejected": "b", "label": 1.5},
                           ":1: field 'label' must be a probability"),
                          ({"prompt": "x", "chosen": 3, "rejected": "b"}, ":1: field 'chosen'"),
                          ({"prompt": "x", "chosen": [user], "rejected": "b"},
                           "must be assistant turns")]:
    with pytest.raises(ValueError, match=message):
      read_preferences(_write(tmp_path / "bad.jsonl", [record]))


def test_builtin_pairs_are_decided_by_the_verifier_and_the_format_rule():
  pairs = task_preferences("arithmetic,countdown", "train", 40, seed=1,
                           kinds="wrong,malformed,rambling,unexplained")
  assert {p.kind for p in pairs} == {"wrong", "malformed", "rambling", "unexplained"}
  problems = {t: {q.prompt: q for q in get_task(t).problems("train", 40, 1)}
              for t in ("arithmetic", "countdown")}
  for p in pairs:
    task = "arithmetic" if p.prompt[0]["content"] in problems["arithmetic"] else "countdown"
    problem = problems[task][p.prompt[0]["content"]]
    chosen, rejected = p.chosen[0]["content"], p.rejected[0]["content"]
    assert get_task(task).verify(problem, chosen).correct and parse_response(chosen).well_formed
    if p.kind == "wrong":
      assert not get_task(task).verify(problem, rejected).correct
    elif p.kind == "malformed":
      assert not parse_response(rejected).well_formed
    elif p.kind == "unexplained":
      assert parse_response(rejected).reasoning == UNEXPLAINED
      assert get_task(task).verify(problem, rejected).correct
    else:
      assert get_task(task).verify(problem, rejected).correct and len(rejected) > len(chosen)
  held_out = {p.prompt[0]["content"] for p in task_preferences("arithmetic", "test", 40, seed=1)}
  assert not held_out & set(problems["arithmetic"])


def test_pairs_encode_response_masks_truncate_and_resume():
  tok = CharTokenizer()
  user = [{"role": "user", "content": "hi"}]
  pairs = [Preference(user, [{"role": "assistant", "content": "a" * n}],
                      [{"role": "assistant", "content": "b"}]) for n in range(1, 9)]
  enc = encode_pairs(tok, pairs, max_len=10)
  tokens, mask = enc.chosen[0]
  assert mask.tolist() == [0] * (len(tokens) - 2) + [1, 1]  # "a" and <|end|> only.
  assert enc.truncated == sum(1 for n in range(1, 9) if n + 7 > 10)
  assert all(len(t) <= 10 for t, _ in enc.chosen)
  dropped = encode_pairs(tok, pairs, max_len=10, truncation="drop")
  assert len(dropped.chosen) + dropped.dropped == 8 and dropped.dropped == enc.truncated
  it = PairBatches(enc, 10, batch_size=2, seed=3, extra={"ref_chosen": np.arange(8.0)})
  first = [next(it) for _ in range(5)]  # Crosses an epoch boundary.
  again = PairBatches(enc, 10, batch_size=2, seed=3, extra={"ref_chosen": np.arange(8.0)})
  again.set_state(PairBatches(enc, 10, 2, seed=3).get_state() | {"epoch": 0, "batch": 2})
  for a, b in zip(first[2:], [next(again) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  b = first[0]
  for j in range(2):
    i = int(b["ref_chosen"][j])  # The extra arrays follow their pair.
    np.testing.assert_array_equal(b["chosen"][j, :len(enc.chosen[i][0])], enc.chosen[i][0])
    assert b["chosen_last"][j] == len(enc.chosen[i][0]) - 1
  with pytest.raises(ValueError, match="fewer than one batch"):
    PairBatches(enc, 10, batch_size=16)
