"""AI feedback: the judge's answer probabilities against a direct computation, the
order-averaged label's invariance to swapping the responses, constitution errors, and RL-CAI
labels of policy samples that the preference readers take unchanged."""

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain import ai_feedback
from posttrain.chat import encode_prompt, encode_text
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
  assert len(pairs) == 4 and all(0.5 <= p.label <= 1.0 for p in pairs)
  assert [p.prompt[0]["content"] for p in pairs] == prompts
  path = str(tmp_path / "prefs.jsonl")
  write_preferences(path, pairs)
  assert [p.label for p in read_preferences(path)] == pytest.approx([p.label for p in pairs])
