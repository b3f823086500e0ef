"""ModelConfig validation, presets, parameter counts and FLOPs."""

import time

import numpy as np
import pytest

from model.config import PRESETS, ModelConfig, YarnConfig, get_preset
from tests.conftest import small_config


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts=6, num_expert_groups=4), "num_experts (6) must be divisible by num_expert_groups"),
    (dict(experts_per_token=9), "experts_per_token (9) must not exceed num_experts"),
    (dict(topk_groups=5), "topk_groups (5) must not exceed num_expert_groups"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be positive"),
    (dict(q_lora_rank=-1), "q_lora_rank must be positive"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim must be even"),
    (dict(v_head_dim=0), "v_head_dim must be positive"),
    (dict(experts_per_token=5, topk_groups=2), "exceeds the 2 kept groups x 2 experts"),
    (dict(num_expert_groups=8, topk_groups=2), "at least 2 experts"),
    (dict(score_func="relu"), "score_func must be one of"),
    (dict(first_k_dense=4), "first_k_dense must be in"),
    (dict(attention_type="gqa", num_kv_heads=3), "num_heads (2) must be divisible by num_kv_heads"),
    (dict(capacity_factor=0.0), "capacity_factor must be positive"),
    (dict(dtype="int8"), "dtype must be"),
    (dict(remat_policy="some"), "remat_policy must be one of"),
    (dict(layer_loop="while"), "layer_loop must be one of"),
    *[(dict([(name, 0)]), f"{name} must be positive, got 0") for name in (
        "vocab_size", "d_model", "num_layers", "num_heads", "dense_ffn_dim", "max_seq_len",
        "qk_nope_head_dim", "qk_rope_head_dim", "moe_ffn_dim", "experts_per_token",
        "num_expert_groups", "topk_groups")],
    (dict(rope_theta=-1.0), "rope_theta must be positive"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be positive"),
    (dict(attention_type="mha"), "attention_type must be one of"),
    (dict(attention_type="gqa", num_kv_heads=0), "num_kv_heads must be positive"),
    (dict(attention_type="gqa", num_kv_heads=2, head_dim=0), "head_dim must be positive"),
    (dict(attention_type="gqa", num_kv_heads=2, head_dim=7), "head_dim must be even"),
    (dict(num_experts=-1), "num_experts must be >= 0"),
    (dict(mtp_depth=-1), "mtp_depth must be >= 0"),
    (dict(attention_impl="fast"), "attention_impl must be one of"),
    (dict(moe_impl="fast"), "moe_impl must be one of"),
    (dict(moe_dispatch="mail"), "moe_dispatch must be one of"),
    (dict(num_shared_experts=-1), "num_shared_experts must be >= 0"),
    (dict(topk_method="best"), "topk_method must be one of"),
])
def test_validation_names_the_field(changes, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    small_config(**changes)


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=2.5), "ModelConfig.num_heads must be int, got float 2.5"),
    (dict(num_layers=True), "ModelConfig.num_layers must be int, got bool True"),
    (dict(norm_topk_prob=1), "ModelConfig.norm_topk_prob must be bool, got int 1"),
    (dict(dtype=16), "ModelConfig.dtype must be str, got int 16"),
    (dict(q_lora_rank=8.0), "ModelConfig.q_lora_rank must be int, got float 8.0"),
    (dict(init_std="0.02"), "ModelConfig.init_std must be float, got str '0.02'"),
])
def test_field_types_are_checked(changes, message):
  with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
    small_config(**changes)
  small_config(q_lora_rank=None, capacity_factor=2, rope_theta=10000)  # Ints where floats go.
  small_config(d_model=np.int64(32), rope_theta=np.float32(1e4))  # NumPy numbers pass.
  with pytest.raises(TypeError, match="ModelConfig.yarn must be YarnConfig, got dict"):
    small_config(yarn={"factor": 4.0})


def test_yarn_rules():
  with pytest.raises(ValueError, match="YarnConfig.factor must be >= 1"):
    YarnConfig(factor=0.5)
  with pytest.raises(ValueError, match="YarnConfig.original_max_len must be positive"):
    YarnConfig(original_max_len=0)


def test_yarn_validation():
  with pytest.raises(ValueError, match="beta_fast"):
    YarnConfig(beta_fast=1, beta_slow=2)


def test_unknown_preset_lists_known_ones():
  with pytest.raises(ValueError, match="deepseek_v3_671b"):
    get_preset("v4")


def test_v3_parameter_counts():
  start = time.perf_counter()
  counts = PRESETS["deepseek_v3_671b"].param_counts()
  assert time.perf_counter() - start < 30  # eval_shape of 61 layers: shapes only, seconds.
  assert abs(counts["total"] / 671e9 - 1) < 0.01, counts
  # 37.55B with the input embedding table, 36.63B without it (a lookup); DeepSeek quotes 37B.
  assert abs(counts["activated"] / 37e9 - 1) < 0.02, counts
  assert abs((counts["activated"] - counts["embedding"]) / 37e9 - 1) < 0.02, counts
  # The MTP module: one MoE block + eh_proj + norms (it shares the embedding and head): 11.6B.
  assert abs(counts["mtp"] / 11.61e9 - 1) < 0.01, counts


@pytest.mark.parametrize("name, total, activated", [
    ("deepseek_v2_lite", 15.71e9, 2.66e9),  # DeepSeek quotes 15.7B total, 2.4B activated.
    ("moonlight_16b_a3b", 15.96e9, 2.92e9),  # Moonshot quotes 16B total, 3B activated.
    ("tiny", 1_102_336, 659_968),
])
def test_preset_parameter_counts(name, total, activated):
  counts = PRESETS[name].param_counts()
  assert abs(counts["total"] / total - 1) < 0.005, counts
  assert abs(counts["activated"] / activated - 1) < 0.005, counts


def test_parameter_count_matches_hand_count():
  cfg = small_config(mtp_depth=0)
  d, r, n = cfg.d_model, cfg.kv_lora_rank, cfg.num_heads
  attn = (d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * n * cfg.qk_head_dim
          + d * (r + cfg.qk_rope_head_dim) + r + r * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
          + n * cfg.v_head_dim * d)
  dense = 3 * d * cfg.dense_ffn_dim
  expert = 3 * d * cfg.moe_ffn_dim
  moe = d * cfg.num_experts + cfg.num_experts * expert + expert  # router, routed, shared
  per_layer_norms = 2 * d
  total = (2 * cfg.vocab_size * d + d + 3 * (attn + per_layer_norms) + dense + 2 * moe)
  counts = cfg.param_counts()
  assert counts["total"] == total
  routed = 2 * cfg.num_experts * expert
  assert counts["activated"] == total - routed + routed * 2 // 8


@pytest.mark.parametrize("name, changes", [
    ("deepseek_v3_671b", {}), ("deepseek_v2_lite", {}), ("moonlight_16b_a3b", {}), ("tiny", {}),
    ("tiny", dict(tie_embeddings=True, mtp_depth=2)), ("tiny", dict(num_shared_experts=0)),
    ("tiny", dict(attention_type="gqa", num_kv_heads=2, head_dim=16)),
    ("tiny", dict(num_experts=0, first_k_dense=0, mtp_depth=1)),
])
def test_closed_form_counts_equal_the_built_shapes(name, changes):
  from model.params import count_params
  try:
    cfg = PRESETS[name].replace(**changes)
  except ValueError as e:  # A variant the config refuses is not a count to compare.
    pytest.skip(str(e))
  assert cfg.param_counts() == count_params(cfg)


def test_flops_per_token():
  cfg = small_config(mtp_depth=0)
  counts = cfg.param_counts()
  matmul = counts["activated"] - counts["embedding"]
  attention = 2 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 16 * cfg.num_layers
  assert cfg.flops_per_token(32) == pytest.approx(6 * matmul + 3 * attention)
  assert cfg.flops_per_token(32, causal=False) > cfg.flops_per_token(32)


def test_softmax_scale_rule():
  cfg = small_config(yarn=YarnConfig(factor=40, original_max_len=16, mscale_all_dim=1.0))
  mscale = 0.1 * 1.0 * __import__("math").log(40) + 1
  assert cfg.softmax_scale == pytest.approx(12**-0.5 * mscale**2)
  assert small_config().softmax_scale == pytest.approx(12**-0.5)


def test_same_weights_ignores_only_execution_fields():
  cfg = small_config()
  assert cfg.same_weights_as(cfg.replace(dtype="bfloat16", remat_policy="full",
                                         attention_impl="pallas", moe_impl="blocked"))
  assert not cfg.same_weights_as(cfg.replace(d_model=48))
  assert not cfg.same_weights_as(cfg.replace(num_experts=4, experts_per_token=2, topk_groups=1,
                                             num_expert_groups=1))


def test_from_dict_round_trips_through_json():
  import dataclasses
  import json
  cfg = small_config(yarn=YarnConfig(factor=4.0, original_max_len=16))
  assert ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
  assert cfg.replace(yarn=dict(factor=2.0)).yarn == YarnConfig(factor=2.0)
