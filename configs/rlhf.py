"""RLHF: optimise the policy against a learned reward model with PPO or GRPO, the no-flag default
of posttrain.rlhf.

  python -m posttrain.rlhf --config=configs/rlhf.py --workdir=workdir/rlhf \
      --config.init_from=workdir/sft --config.reward_model=workdir/rm --config.algorithm=ppo
  ... --config.algorithm=grpo      # the same rollouts and rewards, GRPO's objective (`grpo`)

Both algorithms share one rollout budget, learning rate and reward block (configs/ppo.py's rlhf
variant: a KL penalty to the starting policy, the adaptive controller for PPO, beta for GRPO), so
their runs compare like for like. The verifiers' accuracy is logged (reward_accuracy), not
optimised: it is the gold reward of DIR/overoptimisation.png.
"""

from configs import grpo, ppo


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/rlhf.py: unknown variant {arg!r}; use --config.algorithm=ppo|grpo")
  c = ppo.get_config("rlhf")
  c.algorithm = "ppo"  # ppo | grpo.
  g = grpo.get_config("rlhf")
  c.grpo = g.grpo  # GRPO's objective (beta 0.04: KL to the reference).
  c.lora = g.lora  # GRPO only: LoRA adapters (rank > 0) instead of full fine-tuning.
  c.eval = g.eval  # GRPO only: held-out greedy pass@1 probes (eval.tasks, every eval_every).
  c.reward_model = c.rewards.get_ref("reward_model")  # Required: a reward-model workdir.
  return c
