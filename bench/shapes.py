"""DESIGN.md's benchmark shapes, shared by every benchmark."""

from __future__ import annotations

from model.config import ModelConfig

# DESIGN.md's benchmark shapes: sigmoid routing, 1 shared, top-2 of 8 routed, first layer dense.
SHAPES = {
    "bench-tiny": (dict(vocab_size=512, d_model=128, num_layers=4, dense_ffn_dim=256, num_heads=4,
                        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                        v_head_dim=32, moe_ffn_dim=64), (8, 256)),
    "bench-small": (dict(vocab_size=512, d_model=256, num_layers=4, dense_ffn_dim=256, num_heads=4,
                         q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                         v_head_dim=32, moe_ffn_dim=256), (4, 256)),
    "bench-medium": (dict(vocab_size=4096, d_model=512, num_layers=6, dense_ffn_dim=1024,
                          num_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64,
                          qk_rope_head_dim=32, v_head_dim=64, moe_ffn_dim=256), (8, 256)),
}


def bench_config(name: str) -> tuple[ModelConfig, tuple[int, int]]:
  shape, batch = SHAPES[name]
  cfg = ModelConfig(**shape, num_experts=8, num_shared_experts=1, experts_per_token=2,
                    num_expert_groups=1, topk_groups=1, first_k_dense=1, mtp_depth=0,
                    max_seq_len=batch[1], init_std=0.02)
  return cfg, batch
