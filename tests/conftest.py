"""Shared tiny configs for the tests."""

import pytest

from model.config import ModelConfig


def small_config(**changes) -> ModelConfig:
  """A very small MoE + MLA config with group-limited top-2 of 8 experts and one MTP depth."""
  base = dict(vocab_size=61, d_model=32, num_layers=3, num_heads=2, q_lora_rank=16, kv_lora_rank=8,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, dense_ffn_dim=48, moe_ffn_dim=12,
              num_experts=8, num_shared_experts=1, experts_per_token=2, num_expert_groups=4,
              topk_groups=2, first_k_dense=1, mtp_depth=1, max_seq_len=64)
  base.update(changes)
  return ModelConfig(**base)


@pytest.fixture
def cfg():
  return small_config()
