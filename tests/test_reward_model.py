"""Reward model: the Bradley-Terry loss against hand computations, the stage's loss against a
direct computation, and a planted preference learned to >= 95% held-out accuracy."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.heads import ScoredModel, load_scored_model
from posttrain.preferences import Preference, encode_pairs, pair_batch, read_preferences
from posttrain.reward_model import (bradley_terry_loss, reward_function, reward_model,
                                    reward_model_loss, score_chats)
from test_chat import CharTokenizer
from conftest import small_config
from model.transformer import init_model
from train.checkpoint import load_model


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x))


def test_bradley_terry_loss_matches_hand_computation():
  c, r = jnp.array([2.0, -1.0, 0.5]), jnp.array([1.0, 0.5, 0.5])
  label, margin = jnp.array([1.0, 0.7, 0.0]), jnp.array([0.0, 0.25, -1.0])
  got = np.asarray(bradley_terry_loss(c, r, label, margin))
  want = []
  for ci, ri, p, m in zip([2.0, -1.0, 0.5], [1.0, 0.5, 0.5], [1.0, 0.7, 0.0], [0.0, 0.25, -1.0]):
    z = ci - ri - m
    want.append(-(p * _log_sigmoid(z) + (1 - p) * _log_sigmoid(-z)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(bradley_terry_loss(c, r)),
                             [-_log_sigmoid(1.0), -_log_sigmoid(-1.5), math.log(2)], rtol=1e-6)


class SmallCharTokenizer(CharTokenizer):
  """CharTokenizer with ids below a 64-token vocabulary (letters a..z only)."""

  def encode(self, text):
    return [10 + ord(ch) - ord("a") for ch in text]


def test_stage_loss_is_the_direct_computation_with_centring():
  tok = SmallCharTokenizer()
  model = ScoredModel(init_model(small_config(vocab_size=64)), seed=1)
  user = [{"role": "user", "content": "ab"}, {"role": "user", "content": "xyz"}]
  said = lambda text: [{"role": "assistant", "content": text}]
  pairs = [Preference(user[:1], said("cd"), said("e"), label=1.0, margin=0.5),
           Preference(user[1:], said("fgh"), said("i"), label=0.6, margin=0.0)]
  batch = {k: jnp.asarray(v) for k, v in pair_batch(encode_pairs(tok, pairs, 16), [0, 1], 16).items()}
  total, weight, aux = reward_model_loss(center=0.1)(model, batch, None, 0)
  # The same conversations scored one by one, through the reward callable's path.
  r_c = score_chats(model, tok, [p.prompt + p.chosen for p in pairs])
  r_r = score_chats(model, tok, [p.prompt + p.rejected for p in pairs])
  want = sum(-(p * _log_sigmoid(c - r - m) + (1 - p) * _log_sigmoid(-(c - r - m)))
             + 0.1 * (c + r) ** 2 for c, r, p, m in zip(r_c, r_r, (1.0, 0.6), (0.5, 0.0)))
  assert float(weight) == 2.0
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["sums"]["accuracy"]), float(np.sum(r_c > r_r)))


WORDS = ("red", "blue", "cat", "dog", "sun", "tree", "fish", "road", "moon", "leaf")


def _planted_pairs(path, n, seed):
  """Pairs whose chosen response contains the marker word 'zebra' and whose rejected does not."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      words = list(rng.choice(WORDS, 4))
      other = list(rng.choice(WORDS, 4))
      marked = list(words)
      marked.insert(int(rng.integers(5)), "zebra")
      f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS, 3)), "chosen": " ".join(marked),
                          "rejected": " ".join(other)}) + "\n")
  return str(path)


@pytest.mark.slow
def test_reward_model_learns_a_planted_preference(tmp_path, tiny_pretrain):
  from configs.reward_model import get_config
  c = get_config()
  c.init_from = tiny_pretrain
  c.data.update(source="jsonl", paths=_planted_pairs(tmp_path / "train.jsonl", 400, 0),
                eval_paths=_planted_pairs(tmp_path / "eval.jsonl", 96, 1), seq_len=48,
                batch_size=8)
  c.optimizer.update(peak_lr=1e-3, warmup_steps=5)
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every, c.eval_batches = 80, 10, 80, 80, 12
  c.peak_flops = 1e11
  workdir = str(tmp_path / "rm")
  rows = reward_model(c, workdir)
  assert rows[-1]["eval_accuracy"] >= 0.95, rows[-1]
  with pytest.raises(ValueError, match="reward model"):
    load_model(workdir)  # Not a language model: a clear error, not a shape mismatch.
  # The reward callable scores held-out pairs like the loss does.
  rm = reward_function(workdir)
  held = read_preferences(tmp_path / "eval.jsonl")
  prompts = [p.prompt[0]["content"] for p in held]
  chosen = rm(prompts, [p.chosen[0]["content"] for p in held])
  rejected = rm(prompts, [p.rejected[0]["content"] for p in held])
  assert np.mean(np.array(chosen) > np.array(rejected)) >= 0.95
  assert isinstance(load_scored_model(workdir), ScoredModel)
  # RLHF: the reward model as the reward of a GRPO rollout; the verifier's score is still logged.
  from configs.grpo import get_config as grpo_config
  from posttrain.grpo import grpo_stage
  g = grpo_config("rlhf")
  g.init_from, g.rewards.reward_model = tiny_pretrain, workdir
  g.rollout.update(prompts=2, samples=2, max_new_tokens=8, batch_size=4)
  g.data.problems = 8
  stage = grpo_stage(g, str(tmp_path / "rlhf"))
  batch = stage.batches.next_batch(stage.initial_model())
  metrics = stage.batches.pop_metrics()
  assert batch["tokens"].shape[0] == 4
  assert np.isfinite(metrics["reward_reward_model"]) and "reward_accuracy" in metrics
  assert metrics["reward"] == pytest.approx(metrics["reward_reward_model"])
