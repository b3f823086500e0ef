"""PPO for RLHF: a policy with a value head, per-token rewards with a KL penalty to the reference,
GAE, and the clipped policy and value losses (Ziegler et al. 2019; Ouyang et al. 2022).

  python -m posttrain.ppo --config=configs/ppo.py --workdir=workdir/ppo \
      --config.init_from=workdir/sft --config.rewards.reward_model=workdir/rm

Each rollout samples P x G completions through posttrain/rl.py (the one RL loop); the rewards are
the configured reward callables (a reward model, the verifiers), whitened over the rollout and
clipped, given at each completion's last token, plus -kl_coef * (log pi_old - log pi_ref) at
every token. The value head (posttrain/heads.py, on the policy's own trunk: one forward gives
both) estimates the return before each completion token; GAE(gamma, lambda) gives per-token
advantages, whitened over the batch, and returns. The loss, a mean over completion tokens:
  clip(ratio, 1 - eps, 1 + eps) surrogate  +  vf_coef * 0.5 * max((V - R)^2, (V_clip - R)^2),
V_clip = V_old + clip(V - V_old, -value_clip, value_clip). kl_coef is fixed, or adaptive when
kl_target > 0: after each rollout, kl_coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * n / horizon
(n = completions in the rollout), the controller of Ziegler et al.; it is checkpointed.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posttrain.grpo import (RL_BATCH_SOURCE, GrpoConfig, check_rollout_schedule, rl_batches,
                            rl_start, rollout_mismatch, run_rl, token_losses)
from posttrain.heads import ScoredModel
from posttrain.rl import RolloutBatches, RolloutConfig
from posttrain.start import frozen_copy
from train.loop import Stage
from train.loss import jitted_logprobs, layers_first, token_logprobs
from train.step import router_totals


@dataclasses.dataclass(frozen=True)
class PpoConfig:
  """The PPO objective and reward shaping (module docstring)."""

  clip_eps: float = 0.2
  value_clip: float = 0.2
  vf_coef: float = 0.1
  gamma: float = 1.0
  lam: float = 0.95
  kl_coef: float = 0.05  # The initial (or fixed) KL penalty coefficient.
  kl_target: float = 0.0  # > 0: the adaptive controller aims the rollout KL here.
  kl_horizon: float = 10000.0
  whiten_rewards: bool = True  # Whiten the sequence rewards over each rollout.
  reward_clip: float = 5.0  # Then clip them to +-this; 0: no clipping.
  value_init_scale: float = 0.0  # The value head's initial weight scale (0: values start at 0).

  def __post_init__(self):
    if not (self.clip_eps > 0 and self.value_clip > 0 and self.vf_coef >= 0):
      raise ValueError("ppo.clip_eps and ppo.value_clip must be > 0 and ppo.vf_coef >= 0, got "
                       f"{self.clip_eps}, {self.value_clip}, {self.vf_coef}")
    if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
    if self.kl_coef < 0 or self.kl_target < 0 or self.kl_horizon <= 0:
      raise ValueError("ppo.kl_coef, ppo.kl_target must be >= 0 and ppo.kl_horizon > 0")


def gae(rewards_BT: np.ndarray, values_BT: np.ndarray, mask_BT: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
  """Generalised advantage estimates and returns [B, T] over each row's masked tokens, in order
  (the steps of its episode; the value after the last one is 0); zero elsewhere."""
  adv = np.zeros(rewards_BT.shape, np.float64)
  for b in range(rewards_BT.shape[0]):
    steps = np.flatnonzero(mask_BT[b] > 0)
    running, next_value = 0.0, 0.0
    for t in steps[::-1]:
      delta = rewards_BT[b, t] + gamma * next_value - values_BT[b, t]
      running = delta + gamma * lam * running
      adv[b, t], next_value = running, values_BT[b, t]
  returns = np.where(mask_BT > 0, adv + values_BT, 0.0)
  return adv, returns


def adaptive_kl(coef: float, kl: float, target: float, horizon: float, n: int) -> float:
  """Ziegler et al.'s controller: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)."""
  error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
  return coef * (1.0 + error * n / horizon)


def value_losses(values_BT, old_values_BT, returns_BT, value_clip: float):
  """Per-token clipped value losses 0.5 * max((V - R)^2, (V_clip - R)^2) [B, T]."""
  clipped = old_values_BT + jnp.clip(values_BT - old_values_BT, -value_clip, value_clip)
  return 0.5 * jnp.maximum((values_BT - returns_BT) ** 2, (clipped - returns_BT) ** 2)


def token_values(scores_BT):
  """The value before token t is the head's score at t - 1 (the state tokens[:t]): [B, T]."""
  return jnp.pad(scores_BT[:, :-1], ((0, 0), (1, 0)))


def scored_logprobs(model, tokens_BT, mask_BT, temperature: float = 1.0, replay_BLTK=None):
  """One forward of a ScoredModel (policy trunk + value head): the per-token log-probs at
  `temperature` (train.loss.token_logprobs), the values (`token_values`) and the trunk's output.
  `replay_BLTK`: recorded experts per row (routing replay)."""
  scores, out = model(tokens_BT, replay_LBTK=layers_first(replay_BLTK))
  return token_logprobs(out.logits, tokens_BT, mask_BT, temperature), token_values(scores), out


class PpoBatches(RolloutBatches):
  """Rollouts with per-token GAE targets: the RL batch source of PPO."""

  def __init__(self, *args, ppo: PpoConfig, reference, **kwargs):
    super().__init__(*args, **kwargs)
    self.ppo, self.reference, self.kl_coef = ppo, reference, ppo.kl_coef
    self._forward = nnx.jit(lambda model, tokens, mask, replay, temperature: scored_logprobs(
        model, tokens, mask, temperature, replay)[:2], static_argnames=("temperature",))

  needs_old_logprobs = True  # The KL penalty in the per-token rewards reads them.

  def get_state(self) -> dict:
    return dict(super().get_state(), kl_coef=self.kl_coef)

  def set_state(self, state: dict) -> None:
    super().set_state(state)
    self.kl_coef = float(state["kl_coef"])

  def _rollout_forward(self, policy, tokens, mask, replay):
    """The old log-probs and the values, from one forward of the policy and its value head."""
    logp, values = self._forward(policy, tokens, mask, replay, temperature=self.cfg.temperature)
    return dict(old_logprobs=np.asarray(logp), values=np.asarray(values, np.float64) * mask)

  def _targets(self, tokens, mask, forward, rewards_PG, events):
    del events  # PPO's advantages are GAE's.
    p, old, values = self.ppo, forward["old_logprobs"], forward["values"]
    scores = np.asarray(rewards_PG, np.float64).reshape(-1)
    finite = np.isfinite(scores)
    if p.whiten_rewards and finite.sum() > 1:
      scores = (scores - scores[finite].mean()) / (scores[finite].std() + 1e-8)
    if p.reward_clip:
      scores = np.clip(scores, -p.reward_clip, p.reward_clip)
    scores = np.where(finite, scores, 0.0)
    ref = np.asarray(jitted_logprobs(self.reference, tokens, mask, self.cfg.temperature)[0])
    kl_BT = (old - ref) * mask
    rewards_BT = -self.kl_coef * kl_BT
    for b in range(len(scores)):
      steps = np.flatnonzero(mask[b] > 0)
      if steps.size:
        rewards_BT[b, steps[-1]] += scores[b]
    adv, returns = gae(rewards_BT, values, mask, p.gamma, p.lam)
    on = mask > 0
    if on.sum() > 1:  # Whitened over the batch's completion tokens.
      adv = np.where(on, (adv - adv[on].mean()) / (adv[on].std() + 1e-8), 0.0)
    kl = float(kl_BT.sum(-1)[on.any(-1)].mean()) if on.any() else 0.0
    metrics = dict(kl_rollout=kl, kl_coef=self.kl_coef,
                   value_mean=float(values[on].mean()) if on.any() else 0.0,
                   return_mean=float(returns[on].mean()) if on.any() else 0.0)
    if p.kl_target:
      self.kl_coef = adaptive_kl(self.kl_coef, kl, p.kl_target, p.kl_horizon, len(scores))
    f32 = lambda x: np.asarray(x, np.float32)
    return dict(advantages=f32(adv), returns=f32(returns), old_values=f32(values)), metrics


def ppo_loss(cfg: PpoConfig, temperature: float = 1.0):
  """The stage loss_fn over a PPO mini-batch for a ScoredModel (policy trunk + value head):
  (sum over completion tokens of the clipped surrogate + vf_coef x the clipped value loss, the
  completion token count, metrics)."""
  surrogate = GrpoConfig(eps_low=cfg.clip_eps, eps_high=cfg.clip_eps)

  def loss_fn(model, batch, frozen, step):
    del frozen, step
    tokens, mask = batch["tokens"], batch["completion_mask"]
    logp, values, out = scored_logprobs(model, tokens, mask, temperature,
                                        batch.get("replay_experts"))
    policy_BT, clip = token_losses(surrogate, logp, batch["old_logprobs"], batch["advantages"],
                                   mask)
    m = mask.astype(jnp.float32)
    value_BT = value_losses(values, batch["old_values"], batch["returns"], cfg.value_clip) * m
    loss_sum = policy_BT.sum() + cfg.vf_coef * value_BT.sum()
    weight = m.sum()
    value_clipped = (jnp.abs(values - batch["old_values"]) > cfg.value_clip) * m
    mismatch, maxima = rollout_mismatch(batch["old_logprobs"], batch["sampler_logprobs"], mask)
    sums = dict(loss=loss_sum, policy_loss=policy_BT.sum(), value_loss=value_BT.sum(),
                value_clip_fraction=value_clipped.sum(), entropy_proxy=-(logp * m).sum(),
                **mismatch, **{name: value * weight for name, value in clip.items()})
    return loss_sum, weight, dict(sums=sums, totals=dict(completion_tokens=weight,
                                                         **router_totals(out)), maxima=maxima)
  return loss_fn


def ppo_stage(c, workdir: str):
  """The PPO stage: the chat policy with a value head on its trunk, rollouts on the tasks' train
  problems, the configured rewards shaped with a KL penalty to the starting policy."""
  pcfg, rcfg = PpoConfig(**dict(c.ppo)), RolloutConfig(**dict(c.rollout))
  check_rollout_schedule(c, rcfg)
  if rcfg.old_logprobs != "forward":
    raise ValueError("PPO's rollout forward computes the values and the KL reward's log-probs "
                     "anyway: rollout.old_logprobs must be 'forward'")
  policy, tokenizer, run_config = rl_start(c, workdir, ppo=dataclasses.asdict(pcfg),
                                           rollout=dataclasses.asdict(rcfg), scored_head="value")
  cfg = policy.cfg
  tree, rebuild = frozen_copy(policy)  # The reference: a host copy of the starting policy.
  batches = rl_batches(c, rcfg, tokenizer, cfg, source=PpoBatches, ppo=pcfg,
                       reference=rebuild(tree))
  width, rows = batches.width, rcfg.rows // rcfg.minibatches
  model = ScoredModel(policy, seed=c.seed, init_scale=pcfg.value_init_scale)
  return Stage(name="ppo", cfg=cfg, run_config=run_config, batches=batches, batch_size=rows,
               batch_source=RL_BATCH_SOURCE,
               tokens_per_batch=rows * width, loss_fn=ppo_loss(pcfg, rcfg.temperature),
               initial_model=lambda: model, flops_per_token=cfg.flops_per_token(width))


def ppo(c, workdir: str) -> list[dict]:
  """Runs (or resumes) PPO; returns this invocation's logged metrics rows."""
  return run_rl(ppo_stage(c, workdir), c, workdir)


if __name__ == "__main__":
  from posttrain.cli import run_stage_cli
  run_stage_cli("ppo", ppo, lambda row: f"reward {row.get('reward', float('nan')):.3f} "
                                        f"kl {row.get('kl_rollout', float('nan')):.4f}")
