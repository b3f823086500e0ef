"""Multi-turn environments: the Python tool's turns, episodes assembled token by token with
observations masked out of the loss, routing replay over whole episodes, and RL rollouts through
them."""

import dataclasses

import jax
import numpy as np
import pytest

from model.sampling import SamplingConfig
from posttrain import chat, sandbox
from posttrain.environments import PythonTool, make_environment, observation_tokens, run_episodes
from posttrain.rewards import RewardSet
from posttrain.rl import RolloutBatches, RolloutConfig
from posttrain.tasks import get_task
from train.loss import jitted_logprobs

ISOLATION = "namespaces" if sandbox.namespaces_available()[0] else "rlimits"


def test_python_tool_runs_code_then_scores_the_final_turn():
  task = get_task("arithmetic")
  problem = task.problems("test", 1)[0]
  env = PythonTool(task, max_turns=3, isolation=ISOLATION, instructions="Python is available.")
  opening = env.reset(problem)
  assert opening == [{"role": "user", "content": problem.prompt + "\nPython is available."}]
  call = "<think>compute</think>```python\nprint(6 * 7)\n```"
  assert env.step(call) == ([{"role": "tool", "content": "42\n"}], 0.0, False)
  observation, reward, done = env.step("<think>x</think>```python\nprint(1 / 0)\n```")
  assert not done and observation[0]["content"] == "[error] ZeroDivisionError: division by zero"
  final = chat.assistant_content("the tool helped", problem.answer)
  assert env.step(final) == ([], 1.0, True)
  env.reset(problem)
  assert env.step(f"<think>no tool</think>{int(problem.answer) + 1}") == ([], 0.0, True)
  env = PythonTool(task, max_turns=2, timeout_s=1.0, isolation=ISOLATION)
  env.reset(problem)
  observation, _, done = env.step("<think>x</think>```python\nwhile True: pass\n```")
  assert observation[0]["content"].startswith("[timeout]") and not done
  assert env.step(call)[2]  # The last allowed turn is final, code or not.
  with pytest.raises(ValueError, match="environment must be one of"):
    make_environment("chess", task)


@dataclasses.dataclass
class Scripted:
  """An environment that answers every first turn with a fixed tool message, then ends."""

  reply: str = "result 42"
  turns: int = 0

  def reset(self, problem):
    self.turns = 0
    return [{"role": "user", "content": problem.prompt}]

  def step(self, text):
    self.turns += 1
    if self.turns == 1:
      return [{"role": "tool", "content": self.reply}], 0.0, False
    return [], float(len(text) % 2), True


@pytest.fixture(scope="module")
def world(chat_tok):
  from conftest import small_config
  from model.transformer import init_model
  policy = init_model(small_config(vocab_size=chat_tok.vocab_size, max_seq_len=96), seed=1)
  return policy, chat_tok, get_task("arithmetic").problems("train", 8)


def test_episodes_interleave_sampled_turns_and_masked_observations(world):
  policy, tok, problems = world
  # Every token stops a turn: each assistant turn is one sampled token, ended as a real turn.
  sampling = SamplingConfig(temperature=1.0, max_new_tokens=5,
                            stop_tokens=tuple(range(tok.vocab_size)))
  envs = [Scripted() for _ in range(3)]
  episodes = run_episodes(policy, tok, envs, problems[:3], sampling, jax.random.key(0),
                          max_total_tokens=24)
  reply = observation_tokens(tok, [{"role": "tool", "content": "result 42"}])
  assert reply[0] == chat.special_id(tok, "<|tool|>") and reply[-1] == chat.special_id(
      tok, "<|assistant|>")
  r = episodes.responses
  for i in range(3):
    tokens, mask, logp = r.tokens[i], r.loss_mask[i], r.logprobs[i]
    assert len(tokens) == len(mask) == len(logp) <= 24
    first = int(np.argmin(mask))  # The first observation token.
    if episodes.turns[i] == 2:  # Turn, observation, turn.
      assert tokens[first:first + len(reply)] == reply
      assert mask[first:first + len(reply)].sum() == 0 and mask[first + len(reply):].all()
      assert (logp[first:first + len(reply)] == 0).all()
    assert mask[:first].all() and (logp[mask > 0] < 0).all()
  # The assembled rows are what the policy saw: the trainer's log-probs equal the sampler's.
  width = max(len(p) + len(t) for p, t in zip(episodes.prompts, r.tokens))
  rows = np.zeros((3, width), np.int32)
  weights, sampler = np.zeros((3, width), np.float32), np.zeros((3, width), np.float32)
  for i, (p, t) in enumerate(zip(episodes.prompts, r.tokens)):
    rows[i, :len(p) + len(t)] = p + t
    weights[i, len(p):len(p) + len(t)] = r.loss_mask[i]
    sampler[i, len(p):len(p) + len(t)] = r.logprobs[i]
  logp, _ = jitted_logprobs(policy, rows, weights)
  np.testing.assert_allclose(np.asarray(logp), sampler, atol=1e-4)
  assert episodes.turns == [2, 2, 2] and not any(r.truncated)


def test_an_episode_keeps_the_routing_of_the_turn_that_first_ran_each_token():
  from posttrain.environments import _first_routing
  first = np.asarray([[[1, 2], [3, 4], [5, 6], [-1, -1]]])  # Turn 1: its last token never fed.
  second = np.asarray([[[7, 0], [3, 5], [5, 6], [0, 1], [2, 3], [4, 5], [-1, -1]]])  # Re-read.
  merged = _first_routing(first, second)
  np.testing.assert_array_equal(merged, [[[1, 2], [3, 4], [5, 6], [0, 1], [2, 3], [4, 5],
                                          [-1, -1]]])
  assert _first_routing(None, first) is first


def test_episode_routing_replay_reproduces_the_sampler_after_the_router_drifts(world):
  from conftest import small_config
  from model.transformer import init_model
  policy, tok, problems = world
  # Half the vocabulary stops a turn: turns of one to four tokens, some cut (which ends the
  # episode), so records come from decodes (within a turn) and prefills (of earlier turns).
  sampling = SamplingConfig(temperature=1.0, max_new_tokens=4,
                            stop_tokens=tuple(range(0, tok.vocab_size, 2)))
  episodes = run_episodes(policy, tok, [Scripted() for _ in range(6)], problems[:6], sampling,
                          jax.random.key(3), max_total_tokens=24, record_experts=True)
  r = episodes.responses
  assert 2 in episodes.turns and max(int(m.sum()) for m in r.loss_mask) > 2
  width = max(len(p) + len(t) for p, t in zip(episodes.prompts, r.tokens))
  layers, k = policy.cfg.num_moe_layers, policy.cfg.experts_per_token
  rows = np.zeros((6, width), np.int32)
  weights, sampler = np.zeros((6, width), np.float32), np.zeros((6, width), np.float32)
  replay = np.full((6, layers, width, k), -1, np.int32)
  for i, (p, t) in enumerate(zip(episodes.prompts, r.tokens)):
    n = len(p) + len(t)
    rows[i, :n] = p + t
    weights[i, len(p):n] = r.loss_mask[i]
    sampler[i, len(p):n] = r.logprobs[i]
    assert r.experts[i].shape == (layers, n, k)
    # Every token the policy read is recorded (the last one only if a cut turn went on past it).
    assert (r.experts[i][:, :n - 1] >= 0).all()
    replay[i, :, :n] = r.experts[i]
  drifted = init_model(small_config(vocab_size=tok.vocab_size, max_seq_len=96), seed=1)
  drifted.moe_layers.ffn.router.bias[...] = jax.random.normal(
      jax.random.key(4), drifted.moe_layers.ffn.router.bias.shape) * 0.5
  logp, _ = jitted_logprobs(drifted, rows, weights, 1.0, replay)
  np.testing.assert_allclose(np.asarray(logp) * weights, sampler, atol=1e-5)
  rerouted, _ = jitted_logprobs(drifted, rows, weights, 1.0)
  assert np.abs(np.asarray(rerouted) * weights - sampler).max() > 1e-3


def test_rollouts_through_an_environment_mask_tool_tokens(world):
  policy, tok, problems = world
  cfg = RolloutConfig(prompts=2, samples=2, max_new_tokens=24, turn_tokens=5,
                      environment="scripted", max_turns=2, routing_replay=True)
  src = RolloutBatches(problems, tok, RewardSet({"parity": lambda p, c, **f: [
      float(len(x) % 2) for x in c]}, {"parity": 1.0}), cfg, "grpo", environment=lambda p: Scripted())
  assert src.sampling.max_new_tokens == 5 and src.sampling_width == src.width + 5
  src.sampling = dataclasses.replace(src.sampling, stop_tokens=tuple(range(tok.vocab_size)))
  batch = src.next_batch(policy)
  tool = chat.special_id(tok, "<|tool|>")
  on = batch["completion_mask"] > 0
  for row in range(4):
    positions = np.flatnonzero(batch["tokens"][row] == tool)
    assert len(positions) == 1 and not on[row, positions[0]]  # Tool turns carry no loss.
    assert on[row].sum() == 2  # The two one-token assistant turns.
  from flax import nnx
  from posttrain.grpo import GrpoConfig, grpo_loss
  loss = nnx.jit(lambda m, b: grpo_loss(GrpoConfig(), 24)(m, b, None, 0))
  aux = loss(policy, jax.tree.map(jax.numpy.asarray, batch))[2]
  assert float(aux["maxima"]["mismatch_max"]) < 1e-5  # Trainer == sampler, tool tokens aside.
  replay = batch["replay_experts"]  # Routing replay: the episode's experts, up to its last token.
  assert replay.shape == (4, policy.cfg.num_moe_layers, src.width, policy.cfg.experts_per_token)
  for row in range(4):
    last = np.flatnonzero(on[row])[-1]
    assert (replay[row, :, :last] >= 0).all() and (replay[row, :, last:] == -1).all()
  assert src.pop_metrics()["turns"] == 2
  with pytest.raises(ValueError, match="go together"):
    RolloutBatches(problems, tok, src.rewards, cfg, "grpo")
