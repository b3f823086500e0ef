"""HF interop for the DeepSeek family: read and write transformers-format checkpoint directories.

`load_pretrained` reads config.json and safetensors (single file or sharded with an index; hub
per-expert keys or transformers' fused expert keys; FP8 block-quantised weights dequantised on
load), one tensor at a time. `save_pretrained` writes the hub layout, which
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import safetensors_io
from model.config import ModelConfig, YarnConfig
from model.params import abstract_model
from model.transformer import Transformer

_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


# Configs.

def _rope_dict(hf: dict) -> Optional[dict]:
  rope = hf.get("rope_scaling") or hf.get("rope_parameters")
  if not rope or rope.get("rope_type", rope.get("type", "default")) == "default":
    return None
  kind = rope.get("rope_type", rope.get("type"))
  if kind not in ("yarn", "deepseek_yarn"):
    raise ValueError(f"config.json: rope scaling type {kind!r} is not supported (only yarn)")
  return rope


def from_hf_config(hf: dict) -> ModelConfig:
  """A `ModelConfig` from a HF DeepSeek-V2/V3 config.json dict; unsupported fields are named."""
  model_type = hf.get("model_type")
  if model_type not in ("deepseek_v2", "deepseek_v3"):
    raise ValueError(f"config.json: model_type {model_type!r} is not deepseek_v2 or deepseek_v3")
  for field, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("moe_layer_freq", 1)):
    if hf.get(field, allowed) != allowed:
      raise ValueError(f"config.json: {field}={hf[field]!r} is not supported (only {allowed!r})")
  if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
    raise ValueError("config.json: num_key_value_heads must equal num_attention_heads for MLA")
  v3 = model_type == "deepseek_v3"
  rope = _rope_dict(hf)
  yarn = None
  if rope is not None:
    yarn = YarnConfig(
        factor=float(rope["factor"]),
        original_max_len=int(rope["original_max_position_embeddings"]),
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(rope.get("mscale") or 0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0))
  theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
  n_group = hf.get("n_group") or 1
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], attention_type="mla", q_lora_rank=hf.get("q_lora_rank"),
      kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
      dense_ffn_dim=hf["intermediate_size"], moe_ffn_dim=hf["moe_intermediate_size"],
      num_experts=hf.get("n_routed_experts") or 0, num_shared_experts=hf.get("n_shared_experts") or 0,
      experts_per_token=hf.get("num_experts_per_tok") or 1, num_expert_groups=n_group,
      topk_groups=hf.get("topk_group") or n_group,
      score_func="sigmoid" if v3 else "softmax",
      topk_method="noaux_tc" if v3 else hf.get("topk_method", "greedy"),
      # transformers' DeepseekV2 never renormalises the chosen weights, whatever the flag says.
      norm_topk_prob=bool(hf.get("norm_topk_prob", True)) if v3 else False,
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
      first_k_dense=hf.get("first_k_dense_replace", 0), max_seq_len=hf["max_position_embeddings"],
      rope_theta=float(theta), yarn=yarn, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      mtp_depth=hf.get("num_nextn_predict_layers", 0) if v3 else 0,
      init_std=hf.get("initializer_range", 0.02))


def to_hf_config(cfg: ModelConfig) -> dict:
  """The config.json dict transformers reads for `cfg` (DeepseekV3 for sigmoid, V2 for softmax)."""
  if cfg.attention_type != "mla":
    raise ValueError("to_hf_config: attention_type must be 'mla' (HF DeepSeek models use MLA)")
  if cfg.num_experts == 0:
    raise ValueError("to_hf_config: num_experts must be positive for HF DeepSeek models")
  v3 = cfg.score_func == "sigmoid"
  if v3 and cfg.topk_method != "noaux_tc":
    raise ValueError("to_hf_config: sigmoid routing maps to DeepseekV3, which needs "
                     f"topk_method='noaux_tc' (got {cfg.topk_method!r})")
  if not v3 and (cfg.topk_method == "noaux_tc" or cfg.norm_topk_prob):
    raise ValueError("to_hf_config: softmax routing maps to DeepseekV2, which needs topk_method "
                     "'greedy' or 'group_limited_greedy' and norm_topk_prob=False")
  hf = dict(
      model_type="deepseek_v3" if v3 else "deepseek_v2",
      architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.dense_ffn_dim,
      moe_intermediate_size=cfg.moe_ffn_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
      n_shared_experts=cfg.num_shared_experts, n_routed_experts=cfg.num_experts,
      routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank,
      q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
      v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
      n_group=cfg.num_expert_groups, topk_group=cfg.topk_groups,
      num_experts_per_tok=cfg.experts_per_token, first_k_dense_replace=cfg.num_dense_layers,
      norm_topk_prob=cfg.norm_topk_prob, topk_method=cfg.topk_method, hidden_act="silu",
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
      initializer_range=cfg.init_std, moe_layer_freq=1, rope_interleave=True,
      torch_dtype="float32")
  if v3:
    hf.update(scoring_func="sigmoid", num_nextn_predict_layers=cfg.mtp_depth)
  if cfg.yarn is not None:
    y = cfg.yarn
    hf["rope_scaling"] = dict(
        type="yarn", rope_type="yarn", factor=y.factor,
        original_max_position_embeddings=y.original_max_len, beta_fast=y.beta_fast,
        beta_slow=y.beta_slow, mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
  return hf


# The name table: one HF tensor -> (our state path, leading indices into the stacked leaf).

def _block_entries(cfg: ModelConfig, moe: bool):
  attn = [("q_a_proj", ("q_a", "w")), ("q_a_layernorm", ("q_norm", "scale")),
          ("q_b_proj", ("q_b", "w"))] if cfg.q_lora_rank is not None else [("q_proj", ("q", "w"))]
  attn += [("kv_a_proj_with_mqa", ("kv_a", "w")), ("kv_a_layernorm", ("kv_norm", "scale")),
           ("kv_b_proj", ("kv_b", "w")), ("o_proj", ("o", "w"))]
  for name, sub in attn:
    yield f"self_attn.{name}.weight", ("attn",) + sub, ()
  yield "input_layernorm.weight", ("attn_norm", "scale"), ()
  yield "post_attention_layernorm.weight", ("ffn_norm", "scale"), ()
  projections = ("gate", "up", "down")
  if not moe:
    for p in projections:
      yield f"mlp.{p}_proj.weight", ("ffn", p, "w"), ()
    return
  yield "mlp.gate.weight", ("ffn", "router", "w"), ()
  if cfg.score_func == "sigmoid":
    yield "mlp.gate.e_score_correction_bias", ("ffn", "router", "bias"), ()
  for p in projections if cfg.num_shared_experts else ():
    yield f"mlp.shared_experts.{p}_proj.weight", ("ffn", "shared", p, "w"), ()
  for e in range(cfg.num_experts):
    for p in projections:
      yield f"mlp.experts.{e}.{p}_proj.weight", ("ffn", f"w_{p}"), (e,)


def hf_entries(cfg: ModelConfig) -> Iterator[tuple[str, tuple, tuple]]:
  """Every (HF name, our path, leading indices) of a model with `cfg`, MTP layers included."""
  yield "model.embed_tokens.weight", ("embed", "embedding"), ()
  for i in range(cfg.num_layers):
    moe = i >= cfg.num_dense_layers
    stack, idx = ("moe_layers", i - cfg.num_dense_layers) if moe else ("dense_layers", i)
    for name, sub, extra in _block_entries(cfg, moe):
      yield f"model.layers.{i}.{name}", (stack,) + sub, (idx,) + extra
  yield "model.norm.weight", ("final_norm", "scale"), ()
  if not cfg.tie_embeddings:
    yield "lm_head.weight", ("head", "w"), ()
  for k in range(cfg.mtp_depth):
    base = f"model.layers.{cfg.num_layers + k}."
    for name, sub in (("enorm", ("embed_norm", "scale")), ("hnorm", ("hidden_norm", "scale")),
                      ("eh_proj", ("proj", "w")), ("shared_head.norm", ("norm", "scale"))):
      yield base + name + ".weight", ("mtp", k) + sub, ()
    for name, sub, extra in _block_entries(cfg, cfg.num_experts > 0):
      yield base + name, ("mtp", k, "block") + sub, extra


def _to_ours(path: tuple, hf_array: np.ndarray, shape: tuple) -> np.ndarray:
  """torch Linear weights are [out, in]; ours are [in..., out...]."""
  if hf_array.ndim == 2 and path != ("embed", "embedding"):
    hf_array = hf_array.T
  return hf_array.reshape(shape)


def _hf_shape(path: tuple, shape: tuple) -> tuple:
  """The HF tensor shape of our leaf shape `shape`: torch Linear [out, in] for matrices."""
  if len(shape) == 1 or path == ("embed", "embedding"):
    return tuple(shape)
  in_ndim = 2 if path[-2] == "o" else 1  # o: [N, V, D] takes two input axes.
  return (int(np.prod(shape[in_ndim:])), int(np.prod(shape[:in_ndim])))


def _to_hf(path: tuple, ours: np.ndarray) -> np.ndarray:
  if ours.ndim == 1 or path == ("embed", "embedding"):
    return ours
  out_size, in_size = _hf_shape(path, ours.shape)
  return ours.reshape(in_size, out_size).T


# Loading.

def _hub_tensors(files: list[str], block: tuple[int, int]) -> Iterator[tuple[str, np.ndarray]]:
  """Tensors in hub naming: fused experts split per expert, FP8 weights dequantised."""
  pending_fp8, pending_scale = {}, {}
  for path in files:
    for name, array in safetensors_io.iter_tensors(path):
      if name.endswith(".weight_scale_inv"):
        weight_name = name[:-len("_scale_inv")]
        if weight_name in pending_fp8:
          yield weight_name, safetensors_io.dequantize_fp8(pending_fp8.pop(weight_name), array, block)
        else:
          pending_scale[weight_name] = array
        continue
      if "float8" in array.dtype.name:
        if name in pending_scale:
          yield name, safetensors_io.dequantize_fp8(array, pending_scale.pop(name), block)
        else:
          pending_fp8[name] = array
        continue
      fused = _FUSED.match(name)
      if fused:
        prefix, kind = fused.groups()
        for e in range(array.shape[0]):
          if kind == "gate_up_proj":
            gate, up = np.split(array[e], 2, axis=0)
            yield f"{prefix}.{e}.gate_proj.weight", gate
            yield f"{prefix}.{e}.up_proj.weight", up
          else:
            yield f"{prefix}.{e}.down_proj.weight", array[e]
        continue
      yield name, array
  if pending_fp8:
    raise ValueError(f"FP8 weights without weight_scale_inv: {sorted(pending_fp8)[:5]}")


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def load_pretrained(path: str, dtype=jnp.float32) -> Transformer:
  """A `Transformer` with the weights of the HF DeepSeek-V2/V3 checkpoint directory at `path`.

  `dtype` is both the parameters' storage dtype and the compute dtype of the returned model.
  Tensors are read one at a time (memory-mapped) into a single host buffer per parameter.
  """
  config_path = os.path.join(path, "config.json")
  with open(config_path) as f:
    hf = json.load(f)
  cfg = from_hf_config(hf).replace(dtype=jnp.dtype(dtype).name)
  files = safetensors_io.checkpoint_files(path)
  names = set()
  for file in files:
    names.update(safetensors_io.read_header(file))
  present = sum(f"model.layers.{cfg.num_layers + k}.eh_proj.weight" in names
                for k in range(cfg.mtp_depth))
  cfg = cfg.replace(mtp_depth=present)  # Checkpoints saved by transformers drop the MTP layers.
  quant = hf.get("quantization_config") or {}
  block = tuple(quant.get("weight_block_size", (128, 128)))

  graphdef, state = nnx.split(abstract_model(cfg))
  shapes = nnx.to_pure_dict(state)
  entries = {name: (p, idx) for name, p, idx in hf_entries(cfg)}
  buffers, seen = {}, set()
  for name, array in _hub_tensors(files, block):
    if name not in entries:
      layer = re.match(r"model\.layers\.(\d+)\.", name)
      mtp_shared = (layer and int(layer.group(1)) >= cfg.num_layers
                    and re.search(r"\.(embed_tokens|shared_head\.head)\.weight$", name))
      if _IGNORED.search(name) or mtp_shared:
        continue
      raise ValueError(f"{path}: tensor {name!r} has no place in a model with this config.json")
    leaf_path, idx = entries[name]
    leaf = _get(shapes, leaf_path)
    if leaf_path not in buffers:
      buffers[leaf_path] = np.empty(leaf.shape, jnp.dtype(dtype))
    target = buffers[leaf_path][idx] if idx else buffers[leaf_path]
    if tuple(array.shape) != _hf_shape(leaf_path, target.shape):  # Exact: a transposed tensor
      raise ValueError(                                           # of the same size is wrong too.
          f"{path}: tensor {name!r} has shape {tuple(array.shape)}, this config.json needs "
          f"{_hf_shape(leaf_path, target.shape)} (for {'.'.join(map(str, leaf_path))}"
          f"{list(idx)}, shaped {target.shape} here)")
    target[...] = _to_ours(leaf_path, np.asarray(array, np.float32), target.shape)
    seen.add(name)
  missing = [n for n in entries if n not in seen]
  if missing:
    raise ValueError(f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}")
  for leaf_path in list(buffers):
    parent = _get(shapes, leaf_path[:-1])
    parent[leaf_path[-1]] = jnp.asarray(buffers.pop(leaf_path))
  for leaf_path, leaf in nnx.to_flat_state(state):
    unfilled = isinstance(_get(shapes, leaf_path), jax.ShapeDtypeStruct)
    if unfilled and leaf_path[-1] == "bias" and "router" in leaf_path:
      # DeepSeek-V2 has no selection bias: ours stays at zero, which routes exactly like V2.
      _get(shapes, leaf_path[:-1])[leaf_path[-1]] = jnp.zeros(leaf.shape, jnp.float32)
  nnx.replace_by_pure_dict(state, shapes)
  return nnx.merge(graphdef, state)


# Saving.

def save_pretrained(model: Transformer, path: str, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `model` as a HF checkpoint directory (config.json + sharded float32 safetensors)."""
  cfg = model.cfg
  hf = to_hf_config(cfg)
  os.makedirs(path, exist_ok=True)
  values = nnx.to_pure_dict(nnx.state(model))

  def tensors():
    for name, leaf_path, idx in hf_entries(cfg):
      array = np.asarray(_get(values, leaf_path), np.float32)
      yield name, _to_hf(leaf_path, array[idx] if idx else array)
    if cfg.mtp_depth:  # DeepSeek's MTP layers carry copies of the shared embedding and head.
      embed = np.asarray(values["embed"]["embedding"], np.float32)
      head = embed if cfg.tie_embeddings else np.asarray(values["head"]["w"], np.float32).T
      for k in range(cfg.mtp_depth):
        base = f"model.layers.{cfg.num_layers + k}."
        yield base + "embed_tokens.weight", embed
        yield base + "shared_head.head.weight", head

  safetensors_io.write_sharded(tensors(), path, max_shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
