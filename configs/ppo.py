"""PPO with a value head on the policy's trunk (posttrain/ppo.py): the no-flag default of
posttrain.ppo optimises the verifiers' reward; the rlhf variant a learned reward model.

  python -m posttrain.ppo --config=configs/ppo.py --workdir=workdir/ppo --config.init_from=workdir/sft
  python -m posttrain.ppo --config=configs/ppo.py:rlhf --config.rewards.reward_model=workdir/rm \
      --workdir=workdir/ppo_rlhf --config.init_from=workdir/sft

Rollouts, prompts and rewards are GRPO's (configs/grpo.py: `data`, `rollout`, `rewards`);
`ppo` holds the objective and the KL shaping.
"""

import ml_collections

from configs import common, grpo


def get_config(arg=None):
  base = grpo.get_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # Required: an SFT workdir (any chat checkpoint) or a HF directory.
  c.model_overrides = common.model_overrides()
  c.data = base.data
  c.rollout = base.rollout
  c.rollout.update(prompts=8, samples=4, minibatches=2, epochs=2)  # Reused: PPO's epochs.
  c.rewards = base.rewards
  c.ppo = ml_collections.ConfigDict(dict(
      clip_eps=0.2, value_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
      kl_coef=0.05,  # Initial (or fixed) KL penalty per token.
      kl_target=0.0,  # > 0: Ziegler et al.'s adaptive controller aims the rollout KL here.
      kl_horizon=10000.0, whiten_rewards=True, reward_clip=5.0, value_init_scale=0.0))
  common.add_rl_training(c, peak_lr=5e-5, log_every=4)
  if arg == "rlhf":  # PPO against a learned reward: pass --config.rewards.reward_model=DIR.
    c.rewards.accuracy = 0.0  # The verifier's score is logged (reward_accuracy), not optimised.
    c.ppo.kl_target = 6.0  # The adaptive controller, as Ziegler et al. ran it.
  elif arg:
    raise ValueError(f"configs/ppo.py: unknown variant {arg!r}; known: rlhf")
  return c
