"""Sampling responses from a policy: the one path evaluation and RL rollouts take.

Prompts are token lists; they are right-padded to one width and run through `model.generate`
(prefill, then the jitted decode loop over the absorbed-MLA latent cache) in fixed-size batches,
so a whole evaluation compiles once per sampling setting. The last batch is filled with copies of
its first prompt, whose responses are discarded.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from model.generate import generate, pad_prompts
from model.sampling import SamplingConfig
from posttrain import chat
from posttrain.tasks import Problem

PROMPT_STYLES = ("chat", "plain")


@dataclasses.dataclass(frozen=True)
class Responses:
  """Sampled continuations, one entry per prompt row, in prompt order."""

  tokens: list[list[int]]  # Generated ids, the stop token included when one was emitted.
  logprobs: list[np.ndarray]  # The sampler's log p(token) at the sampling temperature.
  truncated: list[bool]  # Stopped by max_new_tokens, not by a stop token.
  # With record_experts: per row [moe layers, prompt + response, K] int32, the experts each of its
  # tokens was routed to (-1: not run, e.g. the last sampled token); else None.
  experts: list[np.ndarray] | None = None
  # Per row, 1 on tokens the policy sampled and 0 on tokens it did not (an environment's
  # observations, posttrain/environments.py); None: every token was sampled.
  loss_mask: list[np.ndarray] | None = None


def sample(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, key,
           batch_size: int = 64, progress=None, record_experts: bool = False,
           width: int | None = None) -> Responses:
  """Continuations of every prompt under `sampling` (key folded with the batch index).
  `progress`: an optional tqdm-like bar advanced by each batch's row count. `record_experts`:
  also the routing of every token (routing replay). `width`: the padded prompt width (default
  the longest prompt; fix it to keep one compiled shape across calls)."""
  width = max(len(p) for p in prompts) if width is None else width
  tokens, logprobs, truncated, experts = [], [], [], []
  stops = set(sampling.stop_tokens)
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)
    tokens_BT, lengths_B = pad_prompts(chunk, sampling.pad_token, width)
    out = jax.device_get(generate(model, tokens_BT, lengths_B,
                                  jax.random.fold_in(key, start // batch_size), sampling,
                                  record_experts=record_experts))
    for row in range(real):
      n = int(out.lengths[row])
      ids = [int(t) for t in out.tokens[row, :n]]
      tokens.append(ids)
      logprobs.append(np.asarray(out.logprobs[row, :n]))
      truncated.append(not ids or ids[-1] not in stops)
      if out.experts is not None:  # Recorded only when asked for and the model routes.
        experts.append(np.asarray(out.experts[:, row, :len(chunk[row]) + n]))
    if progress is not None:
      progress.update(real)
  return Responses(tokens, logprobs, truncated, experts or None)


def prompt_tokens(tokenizer, problem: Problem, style: str) -> list[int]:
  """The prompt ids for `problem`: a chat with a generation prompt, or plain text after bos."""
  if style == "chat":
    return chat.encode_prompt(tokenizer, [{"role": "user", "content": problem.prompt}])
  if style == "plain":
    return [tokenizer.bos_id] + tokenizer.encode(problem.prompt)
  raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {style!r}")


def response_text(tokenizer, ids: Sequence[int], style: str) -> str:
  """A response's text: up to `<|end|>` in chat style, its first line in plain style."""
  text = chat.decode(tokenizer, ids)
  if style == "chat":
    return text.split(chat.END, 1)[0]
  return text.strip().split("\n", 1)[0]
