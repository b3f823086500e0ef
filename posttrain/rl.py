"""The RL loop's batch source, shared by RLVR (GRPO family) and RLHF: each rollout samples P
prompts x G completions from the current policy (posttrain/rollout.py, the one sampling path),
scores them with reward callables, turns rewards into group advantages, and serves the rollout
batch as mini-batches for one or more optimisation epochs. The training loop hands it the policy
each step (`next_batch(policy)`); its state (rollout count, prompt order and cursor) is
checkpointed with the model, so a resumed run samples exactly what the uninterrupted one would.

Every update measures the rollout/training mismatch (in the loss, `rollout_mismatch`): the
sampler's per-token log-probs against the training forward's on the same tokens under the
rollout's weights, both at the sampling temperature: mean and max absolute difference, and the KL
estimate mean(sampler - train) under the sampler. When a rollout serves one update, the loss's
own forward is that training forward (its log-probs, stop-gradient, are the "old" ones, as TRL
does); when it serves several, or a source's targets need them (PPO's KL reward), the old
log-probs are computed once per rollout before any update, unless `rollout.old_logprobs` is
"sampler": then the sampler's log-probs are the old ones of every update (no forward; the ratio's
denominator is the policy that really sampled), and the mismatch metrics compare the update's
own forward with the sampler (on a rollout's first update exactly the mismatch; on later ones it
includes the updates since). With
`routing_replay` the sampler records each token's experts per MoE layer and every training forward
on the rollout (old log-probs, the loss) routes the tokens to those experts instead of routing
again (routing replay, for MoE stability).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging

from model.sampling import SamplingConfig
from posttrain import chat, rollout
from posttrain.environments import run_episodes
from posttrain.rewards import RewardSet
from posttrain.tasks import Problem
from train.loss import jitted_logprobs
from train.packing import PackLayout

OVERLONG = ("keep", "filter")
OLD_LOGPROBS = ("forward", "sampler")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "process")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How each rollout is sampled and served."""

  prompts: int = 8  # P prompts per rollout.
  samples: int = 8  # G completions per prompt.
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  epochs: int = 1  # Optimisation passes over each rollout batch.
  minibatches: int = 1  # Optimizer steps per pass (each a contiguous slice of the shuffled rows).
  dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards, refill from new prompts.
  max_refills: int = 3  # Extra rounds of P prompts dynamic sampling may draw per rollout.
  overlong: str = "keep"  # "filter": completions cut by max_new_tokens get no loss (DAPO).
  batch_size: int = 64  # Rows per sampling call.
  routing_replay: bool = False  # MoE: the training forward uses the experts the sampler chose.
  environment: str = ""  # "" (one sampled answer) or an environment (posttrain/environments.py).
  max_turns: int = 3  # Environment episodes: assistant turns at most.
  turn_tokens: int = 0  # Environment episodes: tokens per assistant turn (0: max_new_tokens).
  # The behaviour policy's log-probs that the ratio of a rollout's updates divides by: "forward"
  # (a training forward under the rollout's weights, once per rollout, when it serves several
  # updates) or "sampler" (the sampler's own, recorded while sampling: no forward; on float32
  # CPU the two agree within 2e-5).
  old_logprobs: str = "forward"

  def __post_init__(self):
    if self.prompts < 1 or self.samples < 1:
      raise ValueError(f"rollout.prompts and rollout.samples must be >= 1, got {self.prompts}, "
                       f"{self.samples}")
    if (self.prompts * self.samples) % self.minibatches:
      raise ValueError(f"rollout.minibatches {self.minibatches} must divide prompts x samples = "
                       f"{self.prompts * self.samples}")
    if self.epochs < 1 or self.minibatches < 1 or self.max_refills < 0:
      raise ValueError("rollout.epochs and rollout.minibatches must be >= 1, max_refills >= 0")
    if self.overlong not in OVERLONG:
      raise ValueError(f"rollout.overlong must be one of {OVERLONG}, got {self.overlong!r}")
    if self.old_logprobs not in OLD_LOGPROBS:
      raise ValueError(f"rollout.old_logprobs must be one of {OLD_LOGPROBS}, got "
                       f"{self.old_logprobs!r}")

  @property
  def updates_per_rollout(self) -> int:
    return self.epochs * self.minibatches

  @property
  def rows(self) -> int:
    return self.prompts * self.samples


def group_advantages(rewards_PG: np.ndarray, kind: str, eps: float = 1e-4) -> np.ndarray:
  """[P, G] advantages of G rewards per prompt (float64 numpy), by `kind` in ADVANTAGES except
  "process" (per token: `process_advantages`). Non-finite rewards get advantage 0 and are left
  out of their group's statistics."""
  r = np.asarray(rewards_PG, np.float64)
  finite = np.isfinite(r)
  n = finite.sum(1, keepdims=True)
  total = np.where(finite, r, 0.0).sum(1, keepdims=True)
  mean = total / np.maximum(n, 1)
  if kind == "grpo":
    var = np.where(finite, (r - mean) ** 2, 0.0).sum(1, keepdims=True) / np.maximum(n - 1, 1)
    out = (r - mean) / (np.sqrt(var) + eps)
  elif kind == "dr_grpo":
    out = r - mean
  elif kind == "rloo":
    if r.shape[1] < 2:
      raise ValueError("rloo needs at least 2 samples per prompt")
    out = np.where(n > 1, r - (total - r) / np.maximum(n - 1, 1), 0.0)
  else:
    raise ValueError(f"group advantage must be grpo, dr_grpo or rloo, got {kind!r}")
  return np.where(finite, out, 0.0)


def process_advantages(events: Sequence, samples: int, width: int, eps: float = 1e-4
                       ) -> np.ndarray:
  """Per-token advantages [rows, width] under process supervision (DeepSeekMath, GRPO with
  process rewards): each row's rewards are events (column, reward) where they are earned (a
  step's credit where the step ends, the rest of the reward on the last token); each group of
  `samples` consecutive rows normalises all its events together by their mean and (unbiased) std,
  and a token's advantage is the sum of its row's normalised events at or after it. A row whose
  events are None (a non-finite reward) gets 0 and is left out of its group's statistics."""
  if len(events) % samples:
    raise ValueError(f"process_advantages: {len(events)} rows are not groups of {samples}")
  out = np.zeros((len(events), width), np.float64)
  for first in range(0, len(events), samples):
    group = [e for e in events[first:first + samples] if e is not None]
    values = np.asarray([r for row in group for _, r in row], np.float64)
    if values.size == 0:
      continue
    mean = values.mean()
    std = np.sqrt(((values - mean) ** 2).sum() / max(values.size - 1, 1))
    for row in range(first, first + samples):
      for column, reward in events[row] or ():
        out[row, :column + 1] += (reward - mean) / (std + eps)
  return out


def language_model(policy):
  """The language model that samples: the policy itself, or the trunk of a policy that carries a
  value head (PPO's posttrain.heads.ScoredModel)."""
  return getattr(policy, "trunk", policy)


class RolloutBatches:
  """Mini-batches of rollouts from the current policy over `problems` (a resumable source)."""

  def __init__(self, problems: Sequence[Problem], tokenizer, rewards: RewardSet,
               cfg: RolloutConfig, advantage: str, seed: int = 0,
               std_eps: float = 1e-4, environment=None, packing: Optional[PackLayout] = None,
               step_credit=None):
    """`environment(problem) -> Environment` (posttrain/environments.py) makes each completion a
    multi-turn episode when cfg.environment is set. `packing`: each served mini-batch carries a
    plan (train/packing.py) that packs its rows for the forward, whose loss must read it.
    `step_credit(problems, completions)`: per row, the (character end, reward) of each step's
    weighted share of the total reward, which the "process" advantage places on the tokens that
    earn it (the rest of the total goes on the last token)."""
    if not problems:
      raise ValueError("RolloutBatches: no problems to sample prompts from")
    if bool(cfg.environment) != (environment is not None):
      raise ValueError("RolloutBatches: rollout.environment and the environment factory go "
                       "together")
    if advantage == "process" and (step_credit is None or environment is not None):
      raise ValueError("RolloutBatches: the process advantage needs step credits and single-turn "
                       "rollouts (no rollout.environment)")
    self.problems, self.tokenizer, self.rewards, self.cfg = list(problems), tokenizer, rewards, cfg
    self.advantage, self.seed, self.std_eps = advantage, seed, std_eps
    self.environment, self.packing, self.step_credit = environment, packing, step_credit
    self.prompt_ids = [
        chat.encode_prompt(tokenizer, environment(p).reset(p)) if environment else
        rollout.prompt_tokens(tokenizer, p, "chat") for p in self.problems]
    self.prompt_width = max(len(p) for p in self.prompt_ids)
    self.width = self.prompt_width + cfg.max_new_tokens  # Every row: one compiled shape.
    # Tokens one sampling call adds: a whole completion, or an environment episode's one turn,
    # which continues from up to `width` tokens.
    turn_tokens = (cfg.turn_tokens or cfg.max_new_tokens) if environment else cfg.max_new_tokens
    self.sampling_width = (self.width + turn_tokens) if environment else self.width
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    self.sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p,
                                   max_new_tokens=turn_tokens,
                                   stop_tokens=chat.stop_tokens(tokenizer), pad_token=pad)
    self.rollouts, self.cursor, self.served = 0, 0, 0
    self.buffer, self.metrics, self._turns = None, [], []
    self._pass, self._permutation = None, None

  # --- resumable state -------------------------------------------------------------------------
  def get_state(self) -> dict:
    return dict(rollouts=self.rollouts, cursor=self.cursor, served=self.served)

  def set_state(self, state: dict) -> None:
    if int(state["served"]) % self.cfg.updates_per_rollout:
      raise ValueError(f"the checkpoint was written {int(state['served'])} mini-batches into a "
                       f"rollout of {self.cfg.updates_per_rollout}: it cannot resume exactly")
    self.rollouts, self.cursor = int(state["rollouts"]), int(state["cursor"])
    self.served, self.buffer = int(state["served"]), None

  # --- prompts ---------------------------------------------------------------------------------
  def _next_problems(self, count: int) -> list[int]:
    """The next `count` problem indices of the per-pass shuffled order (deterministic in seed)."""
    n, picked = len(self.problems), []
    while len(picked) < count:
      order = self._order(self.cursor // n)
      picked.append(int(order[self.cursor % n]))
      self.cursor += 1
    return picked

  def _order(self, epoch: int) -> np.ndarray:
    """The permutation of the problems for pass `epoch` over them (drawn once per pass)."""
    if self._pass != epoch:
      self._pass, self._permutation = epoch, np.random.default_rng(
          [self.seed, epoch]).permutation(len(self.problems))
    return self._permutation

  # --- one rollout -----------------------------------------------------------------------------
  def _sample_groups(self, policy, indices: list[int], key):
    policy = language_model(policy)
    g = self.cfg.samples
    prompts = [self.prompt_ids[i] for i in indices for _ in range(g)]
    problems = [self.problems[i] for i in indices for _ in range(g)]
    replay = self.cfg.routing_replay and policy.cfg.num_moe_layers > 0
    if self.environment is not None:  # Multi-turn: rewards score each episode's last turn.
      episodes = run_episodes(policy, self.tokenizer, [self.environment(p) for p in problems],
                              problems, self.sampling, key, self.cfg.max_new_tokens,
                              min(self.cfg.batch_size, len(prompts)), width=self.width,
                              record_experts=replay)
      out, texts = episodes.responses, episodes.final_texts
      self._turns.extend(episodes.turns)
    else:
      out = rollout.sample(policy, prompts, self.sampling, key,
                           min(self.cfg.batch_size, len(prompts)), record_experts=replay)
      texts = [rollout.response_text(self.tokenizer, ids, "chat") for ids in out.tokens]
    total, parts = self.rewards([p.prompt for p in problems], texts, problems=problems,
                                lengths=[len(t) for t in out.tokens])
    events = (self._reward_events(problems, texts, out.tokens, total)
              if self.advantage == "process" else [None] * len(texts))
    return prompts, out, texts, total, parts, events

  def _reward_events(self, problems, texts, tokens, total) -> list:
    """Per row: (completion token, reward) events whose rewards sum to the row's total: each
    step's credit on the token where the step's text ends (the last token for a step not shown),
    the rest on the last token; None for a non-finite total."""
    events = []
    for credits, ids, text, row_total in zip(self.step_credit(problems, texts), tokens, texts,
                                             total):
      if not np.isfinite(row_total) or len(ids) == 0:
        events.append(None)
        continue
      last = len(ids) - 1  # The response's end (a step not shown) is the last token's.
      row = [(last if end >= len(text) else self._token_ending(ids, end), reward)
             for end, reward in credits]
      events.append(row + [(last, float(row_total) - sum(r for _, r in row))])
    return events

  def _token_ending(self, ids, end: int) -> int:
    """The first completion token whose text reaches character `end` of the response (the last
    token when none does): a binary search over the decoded prefixes, whose lengths only grow."""
    low, high = 0, len(ids) - 1
    while low < high:
      middle = (low + high) // 2
      if len(rollout.response_text(self.tokenizer, ids[:middle + 1], "chat")) >= end:
        high = middle
      else:
        low = middle + 1
    return low

  def _rollout(self, policy) -> None:
    start = time.perf_counter()
    cfg, g = self.cfg, self.cfg.samples
    logging.info("sampling rollout %d: %d prompts x %d", self.rollouts, cfg.prompts, g)
    key = jax.random.fold_in(jax.random.key(self.seed), self.rollouts)
    kept, spare, drawn, rounds = [], [], 0, 0
    while len(kept) < cfg.prompts and rounds <= (cfg.max_refills if cfg.dynamic_sampling else 0):
      indices = self._next_problems(cfg.prompts)
      prompts, out, texts, total, parts, events = self._sample_groups(
          policy, indices, jax.random.fold_in(key, rounds))
      for j in range(cfg.prompts):
        rows = slice(j * g, (j + 1) * g)
        group = dict(prompts=prompts[rows], tokens=out.tokens[rows], logprobs=out.logprobs[rows],
                     well_formed=[chat.parse_response(t).well_formed for t in texts[rows]],
                     truncated=out.truncated[rows], total=total[rows], events=events[rows],
                     experts=out.experts[rows] if out.experts is not None else None,
                     loss_mask=out.loss_mask[rows] if out.loss_mask is not None else None,
                     parts={k: v[rows] for k, v in parts.items()})
        r = group["total"]
        informative = np.all(np.isfinite(r)) and (g == 1 or np.ptp(r) > 0)
        (kept if informative or not cfg.dynamic_sampling else spare).append(group)
      drawn += cfg.prompts
      rounds += 1
    groups = (kept + spare)[:cfg.prompts]  # Spare groups (no signal) are served masked.
    masked = set(range(min(len(kept), cfg.prompts), cfg.prompts)) if cfg.dynamic_sampling else set()
    self._build(policy, groups, masked, drawn, rounds)
    self.metrics[-1]["rollout_seconds"] = time.perf_counter() - start
    self.rollouts += 1

  def _build(self, policy, groups, masked, drawn, rounds) -> None:
    cfg, t = self.cfg, self.width
    n = cfg.rows
    tokens = np.zeros((n, t), np.int32)
    mask = np.zeros((n, t), np.float32)
    sampler = np.zeros((n, t), np.float32)
    rewards = np.stack([gr["total"] for gr in groups])  # [P, G]
    finite = np.isfinite(rewards)
    lengths, truncated, row_lengths, events = [], [], [], []
    # Recorded experts: [rows, moe layers, T, K], -1 (route as usual) where nothing was recorded.
    replay = None
    if groups[0]["experts"] is not None:
      layers, _, k_slots = groups[0]["experts"][0].shape
      replay = np.full((n, layers, t, k_slots), -1, np.int32)
    for j, gr in enumerate(groups):
      for k in range(cfg.samples):
        row = j * cfg.samples + k
        p, c = gr["prompts"][k], gr["tokens"][k]
        tokens[row, :len(p)] = p
        tokens[row, len(p):len(p) + len(c)] = c
        sampler[row, len(p):len(p) + len(c)] = gr["logprobs"][k]
        use = (j not in masked and finite[j, k]
               and not (cfg.overlong == "filter" and gr["truncated"][k]))
        sampled = 1.0 if gr["loss_mask"] is None else gr["loss_mask"][k]  # 0: observations.
        mask[row, len(p):len(p) + len(c)] = float(use) * sampled
        lengths.append(len(c))
        row_lengths.append(len(p) + len(c))
        row_events = gr["events"][k]  # None when the reward is not finite.
        events.append(None if row_events is None else  # Completion token -> column.
                      [(len(p) + token, reward) for token, reward in row_events])
        truncated.append(gr["truncated"][k])
        if replay is not None:
          record = gr["experts"][k][:, :t]
          replay[row, :, :record.shape[1]] = record
    forward = self._rollout_forward(policy, tokens, mask, replay) if self.needs_old_logprobs \
        else {}
    old = forward.get("old_logprobs")
    targets, target_metrics = self._targets(tokens, mask, forward, rewards, events)
    order = np.random.default_rng([self.seed, self.rollouts, 1]).permutation(n)
    self.row_lengths = np.asarray(row_lengths)[order]  # Real tokens per row (for packing).
    self.buffer = dict(tokens=tokens[order], completion_mask=mask[order],
                       sampler_logprobs=sampler[order],
                       **{k: v[order] for k, v in targets.items()})
    if old is not None:
      self.buffer["old_logprobs"] = old[order]
    if replay is not None:
      self.buffer["replay_experts"] = replay[order]
    parts = {k: np.stack([gr["parts"][k] for gr in groups]) for k in groups[0]["parts"]}
    m = dict(reward=float(np.nanmean(rewards)), reward_std=float(np.nanstd(rewards)),
             completion_length=float(np.mean(lengths)),
             completion_length_max=float(np.max(lengths)), truncated=float(np.mean(truncated)),
             format_rate=float(np.mean([w for gr in groups for w in gr["well_formed"]])),
             reward_nonfinite=float((~finite).sum()), prompts_drawn=float(drawn),
             sampling_rounds=float(rounds), groups_masked=float(len(masked)),
             groups_all_equal=float(np.sum(np.ptp(np.where(finite, rewards, 0), axis=1) == 0)))
    m.update({f"reward_{k}": float(np.nanmean(v)) for k, v in parts.items()})
    m.update({f"reward_{k}_std": float(np.nanstd(v)) for k, v in parts.items()})
    m.update(self.rewards.pop_errors())
    m.update(target_metrics)
    if self._turns:  # Environment episodes: assistant turns per episode.
      m["turns"], self._turns = float(np.mean(self._turns)), []
    self.metrics.append(m)

  @property
  def needs_old_logprobs(self) -> bool:
    """Whether each rollout computes the training forward's log-probs before its updates: when it
    serves several (all but the first are off-policy) and they are not the sampler's. One
    update's loss takes them from its own forward."""
    return self.cfg.updates_per_rollout > 1 and self.cfg.old_logprobs == "forward"

  def _rollout_forward(self, policy, tokens, mask, replay) -> dict:
    """What the rollout takes from one training forward under its weights, before its updates
    (when `needs_old_logprobs`): {"old_logprobs": [rows, T]} (PPO's batch source adds the values
    from the same forward). `replay`: the rows' recorded experts [rows, moe layers, T, K], or
    None."""
    logp = jitted_logprobs(language_model(policy), tokens, mask, self.cfg.temperature, replay)[0]
    return dict(old_logprobs=np.asarray(jax.device_get(logp)))

  def _targets(self, tokens, mask, forward, rewards_PG, events) -> tuple[dict, dict]:
    """What the objective trains on besides tokens and log-probs, per row in rollout order, and
    metrics: here the group advantages [rows], or per token [rows, T] under the process advantage
    (PPO's batch source computes per-token GAE). `forward`: `_rollout_forward`'s results ({} when
    the rollout takes none); `events`: per row its (column, reward) events (process advantage)."""
    del mask, forward
    if self.advantage == "process":
      advantages = process_advantages(events, self.cfg.samples, tokens.shape[1], self.std_eps)
      return dict(advantages=advantages.astype(np.float32)), {}
    advantages = group_advantages(rewards_PG, self.advantage, self.std_eps)
    return dict(advantages=advantages.reshape(-1).astype(np.float32)), {}

  # --- the loop's interface --------------------------------------------------------------------
  def next_batch(self, policy) -> dict:
    """The next mini-batch; a new rollout with `policy` when the last one is used up."""
    per = self.cfg.rows // self.cfg.minibatches
    position = self.served % self.cfg.updates_per_rollout
    if position == 0 or self.buffer is None:
      self._rollout(policy)
    start = (position % self.cfg.minibatches) * per
    self.served += 1
    batch = {k: v[start:start + per] for k, v in self.buffer.items()}
    plan = (self.packing.plan(self.row_lengths[start:start + per], self.width)
            if self.packing is not None else None)
    return batch if plan is None else dict(batch, **plan)

  def pop_metrics(self) -> dict:
    """Means of the rollout metrics since the last call (empty when there was no rollout)."""
    rows, self.metrics = self.metrics, []
    if not rows:
      return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
