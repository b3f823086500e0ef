"""posttrain.rlhf: one command for PPO or GRPO against a reward model (its runs: the kill
harness's grpo and ppo stages, tests/test_kill_harness.py)."""

import pytest

from configs.rlhf import get_config
from posttrain.rlhf import algorithm_config, rlhf


def test_the_algorithm_picks_its_config_blocks():
  c = get_config()
  with pytest.raises(ValueError, match="config.reward_model is required"):
    algorithm_config(c)
  c.reward_model = "workdir/rm"
  assert c.rewards.reward_model == "workdir/rm"  # One field under two names.
  ppo = algorithm_config(c)
  assert "ppo" in ppo and not {"grpo", "lora", "eval", "algorithm"} & set(ppo)
  assert ppo.rewards.reward_model == "workdir/rm" and ppo.rewards.accuracy == 0.0
  assert ppo.ppo.kl_target == 6.0
  c.algorithm = "grpo"
  grpo = algorithm_config(c)
  assert "grpo" in grpo and "ppo" not in grpo and grpo.grpo.beta == 0.04
  assert grpo.rollout.to_dict() == ppo.rollout.to_dict()  # One rollout budget for both.
  c.algorithm = "reinforce"
  with pytest.raises(ValueError, match=r"config.algorithm must be one of \['grpo', 'ppo'\], got "
                                       r"'reinforce'"):
    rlhf(c, "unused")
  c.algorithm, c.lora.rank = "ppo", 8
  with pytest.raises(ValueError, match="LoRA is for --config.algorithm=grpo"):
    algorithm_config(c)
