"""RLHF against a learned reward model, with PPO or GRPO (`--config.algorithm`): one command for
both, on posttrain/ppo.py and posttrain/grpo.py (one RL loop, one rollout path).

  python -m posttrain.rlhf --config=configs/rlhf.py --workdir=workdir/rlhf \
      --config.init_from=workdir/sft --config.reward_model=workdir/rm --config.algorithm=grpo
"""

from __future__ import annotations

import ml_collections

from posttrain.grpo import grpo
from posttrain.ppo import ppo

ALGORITHMS = {"ppo": ppo, "grpo": grpo}


def algorithm_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The PPO or GRPO run config of an RLHF config: its fields less `algorithm`, the top-level
  `reward_model` (it is rewards.reward_model) and the other algorithm's blocks."""
  if c.algorithm not in ALGORITHMS:
    raise ValueError(f"config.algorithm must be one of {sorted(ALGORITHMS)}, got {c.algorithm!r}")
  if not c.rewards.reward_model:
    raise ValueError("config.reward_model is required: a reward-model workdir "
                     "(python -m posttrain.reward_model)")
  if c.algorithm == "ppo" and c.lora.rank:
    raise ValueError("config.lora.rank: PPO here trains the whole policy and its value head; "
                     "LoRA is for --config.algorithm=grpo")
  fields = c.to_dict()
  dropped = ("grpo", "lora", "eval") if c.algorithm == "ppo" else ("ppo",)
  for name in ("algorithm", "reward_model") + dropped:
    fields.pop(name)
  return ml_collections.ConfigDict(fields)


def rlhf(c: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) RLHF with the configured algorithm; this invocation's logged rows."""
  run_config = algorithm_config(c)  # Checks the algorithm's name first.
  return ALGORITHMS[c.algorithm](run_config, workdir)


if __name__ == "__main__":
  from posttrain.cli import run_stage_cli
  run_stage_cli("rlhf", rlhf, lambda row: f"reward {row.get('reward', float('nan')):.3f} "
                                          f"gold {row.get('reward_accuracy', float('nan')):.3f}")
