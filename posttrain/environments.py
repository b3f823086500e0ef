"""Multi-turn environments: a task problem becomes an episode of assistant turns and observations.

  env = PythonTool(get_task("arithmetic"))
  messages = env.reset(problem)                  # the opening observation: the user's message
  observation, reward, done = env.step(text)     # after each assistant turn (its text)

`observation` is the list of messages (e.g. one `tool` message) that follow the assistant's turn;
`reward` is the task verifier's score on the final turn (0 before it). `run_episodes` (below)
samples many episodes at once through posttrain/rollout.py, the one sampling path: sampled tokens
carry the sampler's log-probs and loss weight 1; observation tokens, which the model did not
produce, weight 0. With `record_experts` (routing replay) each episode also carries the experts
every token was routed to, over its whole prompt and response.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Protocol, Sequence

import jax
import numpy as np

from model.sampling import SamplingConfig
from posttrain import chat, rollout, sandbox
from posttrain.tasks.base import Problem

ENVIRONMENTS = ("single_turn", "python_tool")


class Environment(Protocol):
  """A multi-turn episode over one problem."""

  def reset(self, problem: Problem) -> list[dict]:
    """Starts an episode; the opening messages (the prompt)."""

  def step(self, text: str) -> tuple[list[dict], float, bool]:
    """After an assistant turn `text`: (observation messages, reward, done)."""


@dataclasses.dataclass
class SingleTurn:
  """One answer, scored by the task's verifier: a plain task as an environment."""

  task: object
  problem: Problem | None = None

  def reset(self, problem: Problem) -> list[dict]:
    self.problem = problem
    return [{"role": "user", "content": problem.prompt}]

  def step(self, text: str) -> tuple[list[dict], float, bool]:
    return [], float(self.task.verify(self.problem, text).score), True


@dataclasses.dataclass
class PythonTool:
  """The model may run Python: an assistant turn whose answer holds a ```python block is a tool
  call; the block runs in the sandbox and its output (stdout, or the error's last line, cut to
  `output_chars`) comes back as a `tool` message. A turn without a block, or the `max_turns`-th
  turn, is final and scored by the task's verifier."""

  task: object
  max_turns: int = 3
  timeout_s: float = 2.0
  memory_mb: int = 256
  output_chars: int = 200
  isolation: str = "namespaces"  # "rlimits": rlimits-only isolation (posttrain/sandbox.py).
  instructions: str = ""  # Appended to the user's message, e.g. how to call the tool.
  problem: Problem | None = None
  turns: int = 0

  def __post_init__(self):
    if self.max_turns < 1:
      raise ValueError(f"PythonTool.max_turns must be >= 1, got {self.max_turns}")

  def reset(self, problem: Problem) -> list[dict]:
    self.problem, self.turns = problem, 0
    content = problem.prompt + (f"\n{self.instructions}" if self.instructions else "")
    return [{"role": "user", "content": content}]

  def step(self, text: str) -> tuple[list[dict], float, bool]:
    self.turns += 1
    parsed = chat.parse_response(text)
    code = chat.fenced_code(parsed.answer)
    if code is None or self.turns >= self.max_turns:
      return [], float(self.task.verify(self.problem, text).score), True
    result = sandbox.run(code, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                         isolation=self.isolation)
    output = result.stdout if result.ok else (
        f"[{result.status}] " + (result.stderr.strip().splitlines() or [""])[-1])
    output = chat.strip_structure(output)[:self.output_chars]
    return [{"role": "tool", "content": output}], 0.0, False


def make_environment(name: str, task, **options) -> Environment:
  """An environment by name over `task` (options: the environment's fields)."""
  if name == "single_turn":
    return SingleTurn(task)
  if name == "python_tool":
    return PythonTool(task, **options)
  raise ValueError(f"environment must be one of {ENVIRONMENTS}, got {name!r}")


@dataclasses.dataclass(frozen=True)
class Episodes:
  """Finished episodes, one per environment, in order."""

  prompts: list[list[int]]  # The opening prompt ids (bos, messages, `<|assistant|>`).
  responses: rollout.Responses  # Everything after the prompt, with loss masks (0: observations).
  final_texts: list[str]  # The last assistant turn's text: what rewards score.
  env_rewards: list[float]
  turns: list[int]


def observation_tokens(tokenizer, messages: list[dict]) -> list[int]:
  """Ids of observation messages after an assistant turn, then the next generation prompt: the
  chat format's prompt encoding without its leading bos."""
  if not messages:  # An environment may go on with no observation: only the next prompt.
    return [chat.special_id(tokenizer, chat.ROLE_TOKENS["assistant"])]
  return chat.encode_prompt(tokenizer, messages)[1:]


def run_episodes(model, tokenizer, envs: Sequence[Environment], problems: Sequence[Problem],
                 sampling: SamplingConfig, key, max_total_tokens: int, batch_size: int = 64,
                 width: int | None = None, workers: int | None = None,
                 record_experts: bool = False) -> Episodes:
  """Runs one episode per (env, problem) with the policy `model`: each turn samples every live
  episode's next assistant turn (`sampling.max_new_tokens` at most) in fixed-shape batches, then
  steps the environments (in a thread pool: tool calls run in parallel sandboxes). An episode
  ends when its environment says done, or is cut (truncated) when its tokens after the prompt
  would pass `max_total_tokens`. `width`: every turn's padded prompt width (default the longest
  prompt + max_total_tokens); the model must hold width + sampling.max_new_tokens tokens.

  `record_experts`: each token keeps the experts of the first turn that ran it: a sampled token
  those of its own turn's decode (under which the rest of that turn was sampled), an observation
  and a turn's last token those of the next turn's prefill. Later turns re-read the episode
  (prefill); in float32 they route it as before, in bfloat16 they may not, and then the later
  turns' tokens are replayed under the earlier routing. The episode's last token stays -1."""
  if len(envs) != len(problems):
    raise ValueError(f"run_episodes: {len(envs)} environments for {len(problems)} problems")
  prompts = [chat.encode_prompt(tokenizer, env.reset(p)) for env, p in zip(envs, problems)]
  width = width or max(len(p) for p in prompts) + max_total_tokens  # One compiled shape.
  n = len(envs)
  suffix = [[] for _ in range(n)]
  masks, logprobs = [[] for _ in range(n)], [[] for _ in range(n)]
  final, rewards, turns = [""] * n, [0.0] * n, [0] * n
  experts = [None] * n  # With record_experts: [moe layers, tokens so far, K] per episode.
  done, truncated = [False] * n, [False] * n
  turn = 0
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers or 8) as pool:
    while not all(done):  # Each turn adds tokens: the budget ends every episode eventually.
      live = [i for i in range(n) if not done[i]]
      out = rollout.sample(model, [prompts[i] + suffix[i] for i in live], sampling,
                           jax.random.fold_in(key, turn), min(batch_size, len(live)), width=width,
                           record_experts=record_experts)
      texts = [rollout.response_text(tokenizer, ids, "chat") for ids in out.tokens]
      steps = list(pool.map(lambda a: envs[a[0]].step(a[1]), zip(live, texts)))
      for j, i in enumerate(live):
        ids, observation_msgs, reward, finished = out.tokens[j], *steps[j]
        if out.experts is not None:
          experts[i] = _first_routing(experts[i], out.experts[j])
        turns[i] += 1
        final[i], rewards[i] = texts[j], reward
        room = max_total_tokens - len(suffix[i])
        suffix[i] += ids[:room]
        masks[i] += [1.0] * len(ids[:room])
        logprobs[i] += list(out.logprobs[j][:room])
        if finished:
          done[i], truncated[i] = True, out.truncated[j] or len(ids) > room
          continue
        more = observation_tokens(tokenizer, observation_msgs)
        if out.truncated[j] or len(ids) + len(more) > room:  # No room for the tool's answer.
          done[i], truncated[i] = True, True
          continue
        suffix[i] += more
        masks[i] += [0.0] * len(more)
        logprobs[i] += [0.0] * len(more)
      turn += 1
  recorded = any(e is not None for e in experts)  # Only when asked for and the model routes.
  if recorded:  # Cut to the episode's tokens (its last turn may have been cut).
    experts = [e[:, :len(p) + len(s)] for e, p, s in zip(experts, prompts, suffix)]
  responses = rollout.Responses(suffix, [np.asarray(x, np.float32) for x in logprobs], truncated,
                                loss_mask=[np.asarray(m, np.float32) for m in masks],
                                experts=experts if recorded else None)
  return Episodes(prompts, responses, final, rewards, turns)


def _first_routing(earlier: np.ndarray | None, turn: np.ndarray) -> np.ndarray:
  """An episode's routing record [moe layers, tokens, K] after a turn's record: the earlier
  record wherever it ran a token (>= 0), the turn's elsewhere (its new tokens, and what it ran
  for the first time: the observations and the previous turn's last token)."""
  if earlier is None:
    return turn
  merged = np.array(turn)
  n = min(earlier.shape[1], merged.shape[1])
  merged[:, :n] = np.where(earlier[:, :n] >= 0, earlier[:, :n], merged[:, :n])
  return merged
