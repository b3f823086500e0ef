"""Logit parity with transformers' DeepseekV3/V2ForCausalLM and HF checkpoint round trips."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import hf, safetensors_io  # noqa: E402
from model.config import YarnConfig  # noqa: E402
from model.transformer import forward  # noqa: E402
from tests.conftest import small_config  # noqa: E402

YARN = YarnConfig(factor=4, original_max_len=16, beta_fast=32, beta_slow=1, mscale=1.0,
                  mscale_all_dim=1.0)
V2 = dict(score_func="softmax", norm_topk_prob=False, mtp_depth=0)

PARITY = {
    "v3_qlora_yarn_groups": small_config(yarn=YARN, routed_scaling_factor=2.5, mtp_depth=0),
    "v3_plain_query_dense2_nonorm": small_config(q_lora_rank=None, first_k_dense=2,
                                                 norm_topk_prob=False, routed_scaling_factor=1.5,
                                                 mtp_depth=0, num_layers=4),
    "v3_ungrouped_top3_two_shared": small_config(num_expert_groups=1, topk_groups=1,
                                                 experts_per_token=3, num_shared_experts=2,
                                                 mtp_depth=0),
    "v2_greedy_plain_query_yarn": small_config(
        **V2, topk_method="greedy", q_lora_rank=None, num_expert_groups=1, topk_groups=1,
        yarn=YarnConfig(factor=8, original_max_len=16, mscale=0.707, mscale_all_dim=0.707)),
    "v2_group_limited_yarn_mscale": small_config(
        **V2, topk_method="group_limited_greedy", routed_scaling_factor=2.0,
        yarn=YarnConfig(factor=4, original_max_len=16, mscale=1.0, mscale_all_dim=0.0)),
}


def random_hf_model(cfg, seed=0):
  """A transformers model for `cfg` with weights large enough for routing to matter."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.15 if p.ndim > 1 else 1 + 0.3 * torch.rand_like(p))
    for name, b in model.named_buffers():
      if "e_score_correction_bias" in name:
        b.copy_(torch.rand_like(b) * 0.2 - 0.1)
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _tokens(cfg, seed=1, shape=(2, 20)):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("name", list(PARITY))
def test_logits_match_transformers(name, tmp_path):
  cfg = PARITY[name]
  reference = random_hf_model(cfg)
  reference.save_pretrained(tmp_path)
  ours = hf.load_pretrained(str(tmp_path))
  tokens = _tokens(cfg)
  diff = np.abs(np.asarray(forward(ours, jnp.asarray(tokens)).logits) - hf_logits(reference, tokens))
  print(f"parity {name}: max |diff| = {diff.max():.2e}")
  assert diff.max() <= 1e-4


def test_save_pretrained_round_trip_through_transformers(tmp_path):
  from model.transformer import init_model
  cfg = small_config(yarn=YARN, init_std=0.15)  # MTP depth 1: written as layer 3, ignored by HF.
  ours = init_model(cfg, seed=3)
  ours.moe_layers.ffn.router.bias[...] = jnp.linspace(-0.1, 0.1, 16).reshape(2, 8)
  hf.save_pretrained(ours, str(tmp_path))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  tokens = _tokens(cfg)
  expected = np.asarray(forward(ours, jnp.asarray(tokens)).logits)
  np.testing.assert_allclose(hf_logits(loaded, tokens), expected, atol=1e-4, rtol=0)
  again = hf.load_pretrained(str(tmp_path))  # Our own reader takes the MTP layer back too.
  assert again.cfg.mtp_depth == 1
  np.testing.assert_array_equal(forward(again, jnp.asarray(tokens)).mtp_logits,
                                forward(ours, jnp.asarray(tokens)).mtp_logits)


def _rewrite(src, dst, transform, max_shard_bytes=40_000):
  """Copies a checkpoint, passing every tensor through `transform(name, array) -> [(name, array)]`."""
  os.makedirs(dst, exist_ok=True)
  def tensors():
    for file in safetensors_io.checkpoint_files(src):
      for name, array in safetensors_io.iter_tensors(file):
        yield from transform(name, np.asarray(array))
  safetensors_io.write_sharded(tensors(), dst, max_shard_bytes)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  return config


def test_fused_expert_keys_and_sharded_index(tmp_path):
  cfg = PARITY["v3_qlora_yarn_groups"]
  reference = random_hf_model(cfg, seed=5)
  reference.save_pretrained(tmp_path / "hub")
  experts = {}

  def fuse(name, array):
    parts = name.split(".")
    if ".mlp.experts." not in name:
      return [(name, array)]
    layer, e, proj = int(parts[2]), int(parts[5]), parts[6]
    experts.setdefault(layer, {})[(e, proj)] = array
    if len(experts[layer]) < 3 * cfg.num_experts:
      return []
    w = experts.pop(layer)
    prefix = f"model.layers.{layer}.mlp.experts"
    gate_up = np.stack([np.concatenate([w[(i, "gate_proj")], w[(i, "up_proj")]]) for i in range(8)])
    down = np.stack([w[(i, "down_proj")] for i in range(8)])
    return [(f"{prefix}.gate_up_proj", gate_up), (f"{prefix}.down_proj", down)]

  config = _rewrite(str(tmp_path / "hub"), str(tmp_path / "fused"), fuse)
  (tmp_path / "fused" / "config.json").write_text(json.dumps(config))
  assert len(safetensors_io.checkpoint_files(str(tmp_path / "fused"))) > 1
  ours = hf.load_pretrained(str(tmp_path / "fused"))
  tokens = _tokens(cfg)
  np.testing.assert_allclose(forward(ours, jnp.asarray(tokens)).logits, hf_logits(reference, tokens),
                             atol=1e-4, rtol=0)


def test_fp8_block_quantised_weights_are_dequantised(tmp_path):
  from safetensors.torch import save_file
  cfg = PARITY["v3_qlora_yarn_groups"]
  reference = random_hf_model(cfg, seed=7)
  block = 4
  state, dequantised = {}, {}
  for name, t in reference.state_dict().items():
    quantise = t.ndim == 2 and "embed" not in name and "lm_head" not in name and ".gate." not in name
    if not quantise:
      state[name] = t.contiguous()
      continue
    rows, cols = t.shape
    padded = torch.zeros((-(-rows // block) * block, -(-cols // block) * block))
    padded[:rows, :cols] = t
    tiles = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = tiles.abs().amax(dim=(1, 3)) / 448.0
    q = (tiles / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    state[name] = q
    state[name + "_scale_inv"] = scale.contiguous()
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    dequantised[name] = q.float() * full
  os.makedirs(tmp_path / "fp8")
  save_file(state, str(tmp_path / "fp8" / "model.safetensors"))
  config = hf.to_hf_config(cfg)
  config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
  (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
  ours = hf.load_pretrained(str(tmp_path / "fp8"))
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if name in dequantised:
        p.copy_(dequantised[name])
  tokens = _tokens(cfg)
  np.testing.assert_allclose(forward(ours, jnp.asarray(tokens)).logits, hf_logits(reference, tokens),
                             atol=1e-4, rtol=0)


def test_bad_checkpoints_get_clear_errors(tmp_path):
  cfg = PARITY["v3_qlora_yarn_groups"]
  random_hf_model(cfg).save_pretrained(tmp_path / "ok")
  drop = lambda name, a: [] if name == "model.layers.1.mlp.gate.weight" else [(name, a)]
  config = _rewrite(str(tmp_path / "ok"), str(tmp_path / "missing"), drop)
  (tmp_path / "missing" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="missing from the checkpoint.*layers.1.mlp.gate.weight"):
    hf.load_pretrained(str(tmp_path / "missing"))
  config["hidden_act"] = "gelu"
  (tmp_path / "missing" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
    hf.load_pretrained(str(tmp_path / "missing"))
  # A tensor of the wrong shape: transposed (same size, which a reshape would accept) or cut.
  name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
  for label, change in (("transposed", lambda a: a.T), ("cut", lambda a: a[:-1])):
    shape = {}

    def reshape(n, a, change=change):
      if n == name:
        shape["want"], a = a.shape, change(a)
        shape["got"] = a.shape
      return [(n, a)]
    config = _rewrite(str(tmp_path / "ok"), str(tmp_path / label), reshape)
    (tmp_path / label / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(
        f"tensor {name!r} has shape {shape['got']}, this config.json needs {shape['want']}")):
      hf.load_pretrained(str(tmp_path / label))
