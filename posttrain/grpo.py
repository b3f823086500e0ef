"""The GRPO family's objective: group advantages, the clipped (or CISPO) surrogate per token, KL
to a reference, and the loss aggregations, all selected by name (`GrpoConfig`).

Advantages (per completion, over its group of G samples of one prompt):
  grpo     (r - mean) / (std + eps), std with Bessel's correction as TRL computes it
  dr_grpo  r - mean (Dr. GRPO: no std scaling)
  rloo     r - mean of the other G - 1 (RLOO's leave-one-out baseline)
  process  per token (DeepSeekMath's process supervision): each step's share of the step reward
           (rewards.steps) is an event on the token where the step ends, the rest of the reward
           one on the last token; a group's events are normalised together by their mean and
           std, and a token's advantage is the sum of its completion's events at or after it
Ratio: per token exp(logp - old), or per sequence (GSPO: exp of the length-normalised sum, the
same for every token of the completion). Surrogate:
  clip     -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), with dual-clip
           (for A < 0 the loss is at most -dual_clip * A) when dual_clip > 1
  cispo    -stop_gradient(min(ratio, 1 + eps_high)) * A * logp (CISPO's clipped IS weight)
Truncated importance sampling multiplies each token's loss by stop_gradient(min(exp(old -
sampler), tis_cap)): the trainer's log-probs at rollout time over the sampler's. KL to the
reference (beta > 0): k1 = logp - ref, or k3 = exp(ref - logp) - (ref - logp) - 1, per token.
Aggregation, as (sum, weight) for the one loss convention:
  sequence_mean  mean over completions of each one's token mean (GRPO)
  token_mean     mean over every completion token of the batch (DAPO)
  constant       sum over tokens / max_new_tokens, mean over completions (Dr. GRPO)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.sharding import MeshConfig, make_mesh
from posttrain import lora
from posttrain.environments import make_environment
from posttrain.eval import greedy_probe
from posttrain.plots import overoptimisation_plot, stage_plot
from posttrain.reward_model import reward_function
from posttrain.rewards import (RewardSet, length_penalty, step_accuracy, step_credits,
                               task_accuracy, think_format)
from posttrain.rl import ADVANTAGES, RolloutBatches, RolloutConfig
from posttrain.start import frozen_copy, load_chat_model, tokenizer_record
from posttrain.tasks import get_task, task_names
from train.checkpoint import check_run_config
from train.loop import Stage, loop_fields, run, run_model_fields
from train.loss import sequence_logprobs
from train.packing import PackLayout, batch_plan
from train.parallel import batch_shards
from train.step import router_totals

AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
# Where an RL stage's rows per update come from (named in batch-layout errors).
RL_BATCH_SOURCE = "config.rollout.prompts x samples / minibatches"
RATIOS = ("token", "sequence")
SURROGATES = ("clip", "cispo")
KL_ESTIMATORS = ("k1", "k3")


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
  """The objective's choices (see the module docstring); defaults are DeepSeekMath's GRPO."""

  advantage: str = "grpo"
  aggregation: str = "sequence_mean"
  ratio: str = "token"
  surrogate: str = "clip"
  eps_low: float = 0.2
  eps_high: float = 0.2  # DAPO's clip-higher: 0.28.
  dual_clip: float = 0.0  # > 1 enables dual-clip with this c (3 in the dual-clip paper).
  beta: float = 0.0  # KL coefficient; 0 holds no reference model.
  kl_estimator: str = "k3"
  tis_cap: float = 0.0  # Truncated IS cap C (about 2); 0: off.
  std_eps: float = 1e-4

  def __post_init__(self):
    for name, known in (("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS),
                        ("ratio", RATIOS), ("surrogate", SURROGATES),
                        ("kl_estimator", KL_ESTIMATORS)):
      if getattr(self, name) not in known:
        raise ValueError(f"grpo.{name} must be one of {known}, got {getattr(self, name)!r}")
    if self.eps_low < 0 or self.eps_high < 0:
      raise ValueError(f"grpo.eps_low/eps_high must be >= 0, got {self.eps_low}, {self.eps_high}")
    if self.dual_clip and self.dual_clip <= 1:
      raise ValueError(f"grpo.dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
    if self.beta < 0 or self.tis_cap < 0:
      raise ValueError(f"grpo.beta and grpo.tis_cap must be >= 0, got {self.beta}, {self.tis_cap}")


def token_losses(cfg: GrpoConfig, logp_BT, old_BT, advantages_B, mask_BT):
  """Per-token surrogate losses [B, T] (zero off the completion mask) for advantages per
  completion [B] or per token [B, T] (PPO), and the clip fractions
  {"clip_fraction": all, "clip_low": ratio below 1 - eps_low, "clip_high": above 1 + eps_high},
  each over the masked tokens."""
  mask = mask_BT.astype(jnp.float32)
  log_ratio = (logp_BT - old_BT) * mask
  if cfg.ratio == "sequence":  # GSPO: one length-normalised ratio per completion.
    seq = log_ratio.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    log_ratio = jnp.broadcast_to(seq[:, None], log_ratio.shape)
  ratio = jnp.exp(log_ratio)
  a = (advantages_B if advantages_B.ndim == 2 else advantages_B[:, None]).astype(jnp.float32)
  if cfg.surrogate == "cispo":
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + cfg.eps_high))
    loss = -weight * a * logp_BT
    clipped = ratio > 1.0 + cfg.eps_high
  else:
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = -jnp.minimum(ratio * a, clipped_ratio * a)
    if cfg.dual_clip:
      loss = jnp.where(a < 0, jnp.minimum(loss, -cfg.dual_clip * a), loss)
    clipped = (ratio * a) > (clipped_ratio * a)
  count = jnp.maximum(mask.sum(), 1.0)
  low = clipped & (ratio < 1.0)  # A clipped token sits outside the trust region on one side.
  fractions = dict(clip_fraction=(clipped * mask).sum() / count,
                   clip_low=(low * mask).sum() / count, clip_high=((clipped & ~low) * mask).sum() / count)
  return loss * mask, fractions


def rollout_mismatch(train_BT, sampler_BT, mask_BT) -> tuple[dict, dict]:
  """The rollout/training mismatch over completion tokens: token sums of |train - sampler|
  (mismatch_mean), of sampler - train (mismatch_kl, the KL estimate under the sampler) and of the
  importance weight exp(train - sampler) (is_ratio_mean); and the maxima of the first and last
  (mismatch_max, is_ratio_max). `train`: the training forward's log-probs under the rollout's
  weights, without gradient."""
  on = mask_BT > 0
  diff = jnp.where(on, jax.lax.stop_gradient(train_BT) - sampler_BT, 0.0)
  ratio = jnp.where(on, jnp.exp(diff), 0.0)
  sums = dict(mismatch_mean=jnp.abs(diff).sum(), mismatch_kl=-diff.sum(), is_ratio_mean=ratio.sum())
  maxima = dict(mismatch_max=jnp.abs(diff).max(), is_ratio_max=ratio.max())
  return sums, maxima


def kl_per_token(kind: str, logp_BT, ref_BT):
  """The per-token KL(pi || ref) estimate from samples of pi: k1 or k3 (Schulman's)."""
  if kind == "k1":
    return logp_BT - ref_BT
  d = ref_BT - logp_BT
  return jnp.exp(d) - d - 1.0


def aggregate(kind: str, per_token_BT, mask_BT, max_new_tokens: int):
  """(sum, weight) of per-token values under aggregation `kind` (the loss convention)."""
  mask = mask_BT.astype(jnp.float32)
  lengths = mask.sum(-1)
  if kind == "token_mean":
    return per_token_BT.sum(), mask.sum()
  rows = (lengths > 0).astype(jnp.float32)
  if kind == "sequence_mean":
    return (per_token_BT.sum(-1) / jnp.maximum(lengths, 1.0)).sum(), rows.sum()
  return per_token_BT.sum() / max_new_tokens, rows.sum()


def grpo_loss(cfg: GrpoConfig, max_new_tokens: int, reference=None, temperature: float = 1.0,
              old_from_sampler: bool = False):
  """The stage loss_fn `(policy, batch, frozen, step) -> (sum, weight, aux)` over a rollout
  mini-batch. `reference(frozen)`: the reference model from the frozen trees (when beta > 0).
  Log-probabilities are taken at the rollout `temperature`: the policy optimised is the one
  sampled, as TRL does. `old_from_sampler` (rollout.old_logprobs="sampler"): the ratio divides
  by the sampler's log-probs, and the mismatch metrics compare this forward with the sampler.

  The batch holds `tokens` [B, T] (prompt then completion, right-padded), `completion_mask`
  [B, T] (1 on completion tokens, entry t predicting tokens[t]), `advantages` [B] (or [B, T]
  per token), the sampler's `sampler_logprobs` [B, T] and, when the rollout serves several
  updates, the rollout-time training log-probs `old_logprobs` [B, T]; without them the update
  is on-policy and the old log-probs are this forward's own (stop-gradient: ratio 1, the
  gradient unchanged). A packing plan (train/packing.py's keys) runs the forwards on packed
  rows.
  """
  def loss_fn(policy, batch, frozen, step):
    del step
    tokens, mask = batch["tokens"], batch["completion_mask"]
    plan = batch_plan(batch)
    logp, _, out = sequence_logprobs(policy, tokens, mask, temperature=temperature,
                                     with_output=True, replay_BLTK=batch.get("replay_experts"),
                                     packing=plan)
    own = jax.lax.stop_gradient(logp)
    old = batch["sampler_logprobs"] if old_from_sampler else batch.get("old_logprobs", own)
    per_token, clip = token_losses(cfg, logp, old, batch["advantages"], mask)
    m = mask.astype(jnp.float32)
    if cfg.tis_cap:
      tis = jnp.minimum(jnp.exp(old - batch["sampler_logprobs"]), cfg.tis_cap)
      per_token = per_token * jax.lax.stop_gradient(tis)
    kl_sum = jnp.zeros(())
    if cfg.beta:
      ref, _ = sequence_logprobs(reference(frozen), tokens, mask, temperature=temperature,
                                 packing=plan)
      kl = kl_per_token(cfg.kl_estimator, logp, jax.lax.stop_gradient(ref)) * m
      per_token = per_token + cfg.beta * kl
      kl_sum = kl.sum()
    loss_sum, weight = aggregate(cfg.aggregation, per_token, mask, max_new_tokens)
    tokens_n = m.sum()
    # Sums the step divides by `weight`; token-level diagnostics are rescaled to token means.
    per_weight = weight / jnp.maximum(tokens_n, 1.0)
    mismatch, maxima = rollout_mismatch(own if old_from_sampler else old,
                                        batch["sampler_logprobs"], mask)
    sums = dict(loss=loss_sum, kl=kl_sum * per_weight,
                entropy_proxy=-(logp * m).sum() * per_weight,
                **{name: value * per_weight for name, value in mismatch.items()},
                **{name: value * weight for name, value in clip.items()})
    totals = dict(completion_tokens=tokens_n, **router_totals(out))
    return loss_sum, weight, dict(sums=sums, totals=totals, maxima=maxima)
  return loss_fn


def check_rollout_schedule(c, rcfg: RolloutConfig) -> None:
  """ValueError unless total_steps and checkpoint_every fall between rollouts."""
  for name in ("total_steps", "checkpoint_every"):
    if getattr(c, name) % rcfg.updates_per_rollout:
      raise ValueError(f"config.{name} {getattr(c, name)} must be a multiple of the "
                       f"{rcfg.updates_per_rollout} updates per rollout (epochs x minibatches), "
                       "so every checkpoint falls between rollouts and resumes exactly")


def rl_batches(c, rcfg: RolloutConfig, tokenizer, model_cfg, advantage: str = "grpo",
               std_eps: float = 1e-4, source=RolloutBatches, **source_args):
  """The RL batch source of an RL stage's config `c`: the tasks' train problems (c.data), the
  rewards (c.rewards: verifier accuracy, format, a reward model, the overlong penalty) and, with
  rollout.environment, the environment episodes; checked against the model's max_seq_len."""
  names = task_names(c.data.tasks)
  if c.rewards.code_tests not in ("all", "fraction"):
    raise ValueError(f"config.rewards.code_tests must be 'all' or 'fraction', got "
                     f"{c.rewards.code_tests!r}")
  knobs = dict(program=dict(partial_credit=c.rewards.code_tests == "fraction",
                            isolation=c.rewards.sandbox))
  tasks = {n: get_task(n, **knobs.get(n, {})) for n in names}
  problems = [p for n in names for p in tasks[n].problems("train", c.data.problems, c.data.seed)]
  rewards, weights = {"accuracy": task_accuracy(tasks)}, {"accuracy": c.rewards.accuracy}
  if c.rewards.format:
    rewards["format"], weights["format"] = think_format, c.rewards.format
  if c.rewards.steps:
    unchecked = [n for n in names if not hasattr(tasks[n], "step_score")]
    if unchecked:
      raise ValueError(f"config.rewards.steps checks each step of the reasoning, which the task "
                       f"families {unchecked} cannot: train them with rewards.steps=0")
    rewards["steps"], weights["steps"] = step_accuracy(tasks), c.rewards.steps
  if c.rewards.reward_model:  # RLHF: a learned reward (the verifier's accuracy is still logged).
    rewards["reward_model"] = reward_function(c.rewards.reward_model)
    weights["reward_model"] = c.rewards.reward_model_weight
  if not any(weights.values()):
    raise ValueError("config.rewards: every reward has weight 0 (the rlhf variant needs "
                     "--config.rewards.reward_model=DIR)")
  if c.rewards.overlong_cache:
    rewards["overlong"] = length_penalty(rcfg.max_new_tokens, c.rewards.overlong_cache)
    weights["overlong"] = 1.0
  environment = None
  if rcfg.environment:
    options = dict(max_turns=rcfg.max_turns, isolation=c.rewards.sandbox)
    make_environment(rcfg.environment, tasks[names[0]], **options)  # Checks the name early.
    environment = lambda p: make_environment(rcfg.environment, tasks[p.task], **options)
  if advantage == "process":  # DeepSeekMath's process supervision: step rewards on their tokens.
    if not c.rewards.steps:
      raise ValueError("config.grpo.advantage='process' places the step reward on the tokens of "
                       "each step: set config.rewards.steps > 0")
    source_args["step_credit"] = step_credits(tasks, c.rewards.steps)
  batches = source(problems, tokenizer, RewardSet(rewards, weights), rcfg, advantage,
                   seed=c.data.seed, std_eps=std_eps, environment=environment, **source_args)
  if batches.sampling_width > model_cfg.max_seq_len:
    raise ValueError(f"prompts of up to {batches.prompt_width} tokens + rollout.max_new_tokens "
                     f"{rcfg.max_new_tokens}" + (" + rollout.turn_tokens (an environment's "
                                                  "last turn)" if rcfg.environment else "")
                     + f" exceed the model's max_seq_len {model_cfg.max_seq_len}")
  return batches


def held_out_probe(c, tokenizer, rcfg: RolloutConfig):
  """The RL stage's `evaluate` hook: greedy pass@1 on c.eval.problems held-out problems of each
  family in c.eval.tasks, every c.eval_every steps; None when c.eval.tasks is empty."""
  names = task_names(c.eval.tasks)
  if not names:
    return None
  if not c.eval_every:
    raise ValueError("config.eval.tasks is set but config.eval_every is 0: set how often to "
                     "evaluate")
  return greedy_probe(tokenizer, names, c.eval.problems, rcfg.max_new_tokens, rcfg.batch_size,
                      c.data.seed)


def rl_start(c, workdir: str, **fields):
  """(policy, tokenizer, run_config) of an RL stage: the chat model of `init_from` and the run
  config (model, data, rewards and the stage's own `fields`), checked against the workdir's."""
  if not c.init_from:
    raise ValueError("config.init_from is required: an SFT (or any chat) workdir or HF directory")
  policy, tokenizer = load_chat_model(c.init_from, workdir, dict(c.model_overrides))
  run_config = dict(model=run_model_fields(policy.cfg), data=c.data.to_dict(),
                    init_from=c.init_from, tokenizer=tokenizer_record(tokenizer),
                    rewards=c.rewards.to_dict(), **fields)
  check_run_config(workdir, dict(run_config, **loop_fields(c)))
  return policy, tokenizer, run_config


def run_rl(stage: Stage, c, workdir: str) -> list[dict]:
  """Runs (or resumes) an RL stage; returns this invocation's logged metrics rows. It plots the
  stage's curves where it has a plot (GRPO: DIR/grpo.png, accuracy, length and rewards) and,
  against a reward model, proxy against gold reward (DIR/overoptimisation.png)."""
  rows = run(stage, c, workdir)
  stage_plot(workdir, stage.name)
  if c.rewards.reward_model:
    overoptimisation_plot(workdir)
  return rows


def grpo_stage(c, workdir: str):
  """The GRPO stage: rollouts of the policy on the tasks' train problems, verifier rewards, the
  configured objective; full fine-tuning or LoRA, a reference model only when beta > 0."""
  gcfg, rcfg = GrpoConfig(**dict(c.grpo)), RolloutConfig(**dict(c.rollout))
  check_rollout_schedule(c, rcfg)
  if gcfg.tis_cap and rcfg.old_logprobs == "sampler":
    raise ValueError("grpo.tis_cap weighs the old (training) log-probs against the sampler's; "
                     "with rollout.old_logprobs='sampler' they are the same: set one of them off")
  lora_cfg = lora.LoraConfig(**dict(c.lora))
  policy, tokenizer, run_config = rl_start(
      c, workdir, lora=dataclasses.asdict(lora_cfg), grpo=dataclasses.asdict(gcfg),
      rollout=dataclasses.asdict(rcfg))
  cfg = policy.cfg
  layout = PackLayout(cfg.max_seq_len, c.step.microbatches,
                      batch_shards(make_mesh(MeshConfig(**dict(c.mesh)))))
  batches = rl_batches(c, rcfg, tokenizer, cfg, gcfg.advantage, gcfg.std_eps, packing=layout)
  width = batches.width
  frozen, reference = None, None
  if gcfg.beta:
    tree, rebuild = frozen_copy(policy)
    frozen, reference = {"reference": tree}, lambda f: rebuild(f["reference"])
  rows = rcfg.rows // rcfg.minibatches
  stage = Stage(
      name="grpo", cfg=cfg, run_config=run_config, batches=batches, batch_size=rows,
      batch_source=RL_BATCH_SOURCE,
      tokens_per_batch=rows * width,
      loss_fn=grpo_loss(gcfg, rcfg.max_new_tokens, reference, rcfg.temperature,
                        old_from_sampler=rcfg.old_logprobs == "sampler"),
      initial_model=lambda: policy, frozen=frozen, flops_per_token=cfg.flops_per_token(width),
      evaluate=held_out_probe(c, tokenizer, rcfg))
  return lora.apply(stage, lora_cfg) if lora_cfg.rank else stage


def grpo(c, workdir: str) -> list[dict]:
  """Runs (or resumes) GRPO; returns this invocation's logged metrics rows."""
  return run_rl(grpo_stage(c, workdir), c, workdir)


if __name__ == "__main__":
  from posttrain.cli import run_stage_cli
  run_stage_cli("grpo", grpo, lambda row: f"reward {row.get('reward', float('nan')):.3f}")
