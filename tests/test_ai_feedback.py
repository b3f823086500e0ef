"""AI feedback: the judge's answer probabilities against a direct computation, the
order-averaged label's invariance to swapping the responses, constitution errors, and RL-CAI
labels of policy samples that the preference readers take unchanged, and SL-CAI's
critique-and-revise rounds replayed by hand."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain import ai_feedback
from model.transformer import init_model, with_config
from posttrain.chat import encode_prompt, encode_text
from posttrain.data import read_chat_jsonl
from posttrain.preferences import read_preferences, write_preferences
from posttrain.start import load_chat_model
from train.loss import sequence_logprobs


def test_constitution_file_errors_and_comments(tmp_path):
  path = tmp_path / "c.txt"
  path.write_text("# rules\n\nBe correct.\n  # indented comment\nBe brief.\n")
  assert ai_feedback.read_constitution(str(path)) == ["Be correct.", "Be brief."]
  path.write_text("# nothing but comments\n\n")
  with pytest.raises(ValueError, match="c.txt: the constitution has no principles"):
    ai_feedback.read_constitution(str(path))


@pytest.fixture(scope="module")
def judge(tiny_pretrain):
  return load_chat_model(tiny_pretrain)


def test_judge_probability_is_the_normalised_answer_likelihood(judge):
  model, tok = judge
  q = ai_feedback.judge_question("Be brief.", "Compute 2 + 3.", "<think>2 + 3 = 5</think>5", "6")
  got = ai_feedback.prefer_a(model, tok, [q, q])
  prompt = encode_prompt(tok, [{"role": "user", "content": q}])
  logp = []
  for answer in ai_feedback.ANSWERS:  # Each answer's own forward, unpadded.
    ids = prompt + encode_text(tok, answer)
    mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    logp.append(float(sequence_logprobs(model, jnp.asarray([ids]), jnp.asarray([mask]))[1][0]))
  want = np.exp(logp[0]) / (np.exp(logp[0]) + np.exp(logp[1]))
  np.testing.assert_allclose(got, [want, want], rtol=1e-5)


def test_order_averaged_label_is_invariant_to_the_swap(judge):
  model, tok = judge
  prompts = ["Compute 2 + 3.", "Using 1, 2 make 3."]
  x, y = ["<think>2 + 3 = 5</think>5", "1 + 2"], ["7", "<think>guess</think>2 - 1"]
  principles = [["Be correct.", "Be brief."]] * 2
  forward = ai_feedback.soft_labels(model, tok, prompts, x, y, principles)
  swapped = ai_feedback.soft_labels(model, tok, prompts, y, x, principles)
  np.testing.assert_allclose(forward + swapped, 1.0, atol=1e-6)
  # One order alone is position-biased (an untrained judge): averaging is what removes it.
  q = [ai_feedback.judge_question(principles[0][0], prompts[0], x[0], y[0]),
       ai_feedback.judge_question(principles[0][0], prompts[0], y[0], x[0])]
  pa = ai_feedback.prefer_a(model, tok, q)
  assert abs(pa[0] + pa[1] - 1.0) > 1e-4


@pytest.mark.slow
def test_rl_cai_labels_policy_samples_for_the_preference_paths(judge, tmp_path):
  model, tok = judge
  prompts = ai_feedback.read_prompts("task:arithmetic", 4)
  pairs = ai_feedback.label_policy_samples(model, tok, model, tok, prompts,
                                           ["Be correct.", "Be brief.", "Show steps."], 2,
                                           max_new_tokens=6)
  first, second = ai_feedback.sample_pairs(model, tok, prompts, max_new_tokens=6)  # Same seed.
  distinct = [i for i in range(4) if first[i] != second[i]]
  assert len(pairs) == len(distinct) > 0 and all(0.5 <= p.label <= 1.0 for p in pairs)
  assert [p.prompt[0]["content"] for p in pairs] == [prompts[i] for i in distinct]
  for p, i in zip(pairs, distinct):
    assert {p.chosen[0]["content"], p.rejected[0]["content"]} == {first[i], second[i]}
  # Greedy samples are the same text twice: no pair carries a preference.
  assert ai_feedback.label_policy_samples(model, tok, model, tok, prompts, ["Be brief."], 1,
                                          temperature=0.0, max_new_tokens=6) == []
  path = str(tmp_path / "prefs.jsonl")
  write_preferences(path, pairs)
  assert [p.label for p in read_preferences(path)] == pytest.approx([p.label for p in pairs])


def test_sl_cai_critiques_and_revises_in_the_documented_conversation(judge, tmp_path):
  _, tok = judge  # Random weights: greedy turns that differ with the conversation.
  model = init_model(judge[0].cfg.replace(max_seq_len=512), seed=1)  # Room for two rounds.
  prompts = ai_feedback.read_prompts("task:arithmetic", 2)
  principles = ["Be correct.", "Show steps."]
  records = ai_feedback.critique_revise(model, tok, prompts, principles, rounds=2, temperature=0.0,
                                        max_new_tokens=6)
  # Replay greedily, building each round's conversation by hand from the recorded turns.
  current = ai_feedback.sample_turns(model, tok, [[{"role": "user", "content": p}] for p in prompts],
                                     temperature=0.0, max_new_tokens=6)
  assert [r["initial"] for r in records] == current
  for r in range(2):
    asks = [[{"role": "user", "content": p}, {"role": "assistant", "content": current[i]},
             {"role": "user", "content": "Critique: where does your last response fail this "
                                         f"principle? {records[i]['rounds'][r]['principle']}"}]
            for i, p in enumerate(prompts)]
    critiques = ai_feedback.sample_turns(model, tok, asks, temperature=0.0, max_new_tokens=6)
    revise = [a + [{"role": "assistant", "content": c},
                   {"role": "user", "content": "Rewrite your response so that it follows the "
                                               f"principle: {records[i]['rounds'][r]['principle']}"}]
              for i, (a, c) in enumerate(zip(asks, critiques))]
    revisions = ai_feedback.sample_turns(model, tok, revise, temperature=0.0, max_new_tokens=6)
    for i, record in enumerate(records):
      assert record["rounds"][r]["principle"] in principles
      assert (record["rounds"][r]["critique"], record["rounds"][r]["revision"]) == (
          critiques[i], revisions[i])
    current = [v if v.strip() else c for v, c in zip(revisions, current)]
  assert [r["completion"] for r in records] == current
  assert any(x["revision"].strip() for r in records for x in r["rounds"])
  # The records are SFT data as written.
  path = tmp_path / "sl_cai.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  assert [m[-1]["content"] for m in read_chat_jsonl(str(path))] == current
  # A round that does not fit the context is not run: the first answer stands.
  # A round that does not fit the context is not run: the first answer stands. Where the
  # critique fits but the rewrite does not, the round is not recorded either.
  first = [{"role": "user", "content": prompts[0]}]
  ask = first + [{"role": "assistant", "content": records[0]["initial"]},
                 {"role": "user", "content": ai_feedback.CRITIQUE_REQUEST.format(
                     principle="Show steps.")}]
  for room in (len(encode_prompt(tok, first)), len(encode_prompt(tok, ask))):
    short = with_config(model, model.cfg.replace(max_seq_len=room + 6))
    kept = ai_feedback.critique_revise(short, tok, prompts[:1], ["Show steps."], 1,
                                       temperature=0.0, max_new_tokens=6)
    assert kept[0]["initial"] == records[0]["initial"]
    assert kept[0]["rounds"] == [] and kept[0]["completion"] == kept[0]["initial"]
