"""LoRA: low-rank adapters on named projections, the base weights frozen.

A target weight W (with any leading layer or expert axes) trains as W + (alpha / rank) * A @ B,
A [.., in, rank] drawn at 1/sqrt(in) and B [.., rank, out] zero, so training starts at the base
model exactly. The adapted weights are formed inside the step from the frozen base (a step
argument, sharded like the policy) and the trained adapters: only A and B are in the optimizer,
and merging for export is the same sum, so merged and unmerged models agree.

  python -m posttrain.lora merge --workdir=workdir/sft_lora --out=workdir/sft_merged [--hf]

Targets by name: MLA's q_a, q_b, kv_a, kv_b, o (and q where q_lora_rank is None); gate, up, down
of the dense FFNs and shared experts; experts (the routed experts' w_gate, w_up, w_down).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from model.transformer import Transformer, with_config
from model.vocab import grow_vocab
from posttrain.heads import head_kind, load_scored_model
from train.checkpoint import load_model, restore_weights, save_weights
from train.tokenizer import load_tokenizer

ATTENTION = ("q_a", "q_b", "q", "kv_a", "kv_b", "o")
FFN = ("gate", "up", "down")
TARGETS = ATTENTION + FFN + ("experts",)
_IN_AXES = {"o": 2}  # o maps [heads, v_head] -> d_model; the rest have one input axis.
_OUT_AXES = {"q_b": 2, "kv_b": 2, "q": 2}  # ... -> [heads, head_dim].
_EXPERTS = ("w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank 0 is full fine-tuning; `targets` is a comma-separated subset of TARGETS."""

  rank: int = 0
  alpha: float = 16.0
  targets: str = "q_a,q_b,kv_a,kv_b,o"

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"config.lora.rank must be >= 0, got {self.rank}")
    unknown = set(self.target_names) - set(TARGETS)
    if self.rank and unknown:
      raise ValueError(f"config.lora.targets: unknown {sorted(unknown)}; known: {', '.join(TARGETS)}")

  @property
  def target_names(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.targets.split(",") if t.strip())

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def target_name(path: tuple[str, ...]) -> str | None:
  """The LoRA target a parameter path belongs to ("q_a", "experts", ...), or None."""
  if path[-1] in _EXPERTS:
    return "experts"
  if len(path) >= 3 and path[-1] == "w":
    if path[-3] == "attn" and path[-2] in ATTENTION:
      return path[-2]
    if path[-2] in FFN and path[-3] in ("ffn", "shared"):
      return path[-2]
  return None


def _axes(name: str, ndim: int) -> tuple[int, int, int]:
  """(leading axes, input axes, output axes) of a target weight with `ndim` axes."""
  n_in, n_out = _IN_AXES.get(name, 1), _OUT_AXES.get(name, 1)
  return ndim - n_in - n_out, n_in, n_out


def _walk(tree: dict, path=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _walk(v, path + (k,))
    else:
      yield path + (k,), v


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def init_adapters(params: dict, cfg: LoraConfig, seed: int = 0) -> dict:
  """Adapters {"a", "b"} for every target weight of `params`, nested like `params`."""
  wanted = set(cfg.target_names)
  adapters, key = {}, jax.random.key(seed)
  for path, w in _walk(params):
    name = target_name(path)
    if name not in wanted:
      continue
    lead, n_in, _ = _axes(name, w.ndim)
    in_shape, out_shape = w.shape[lead:lead + n_in], w.shape[lead + n_in:]
    fan_in = math.prod(in_shape)
    key, sub = jax.random.split(key)
    a = jax.random.normal(sub, w.shape[:lead] + in_shape + (cfg.rank,), jnp.float32)
    _set(adapters, path, dict(a=(a / math.sqrt(fan_in)).astype(w.dtype),
                              b=jnp.zeros(w.shape[:lead] + (cfg.rank,) + out_shape, w.dtype)))
  if not adapters:
    raise ValueError(f"config.lora.targets {cfg.targets!r} match no weight of this model")
  return adapters


def delta(name: str, a, b, scale: float):
  """scale * A @ B in the weight's own layout (leading axes kept)."""
  n_in = _IN_AXES.get(name, 1)
  lead_shape = a.shape[:a.ndim - n_in - 1]
  in_shape, out_shape = a.shape[len(lead_shape):-1], b.shape[len(lead_shape) + 1:]
  a2 = a.reshape(lead_shape + (math.prod(in_shape), a.shape[-1]))
  b2 = b.reshape(lead_shape + (b.shape[len(lead_shape)], math.prod(out_shape)))
  return (scale * jnp.matmul(a2, b2)).reshape(lead_shape + in_shape + out_shape)


def merge_params(params: dict, adapters: dict, scale: float) -> dict:
  """`params` with every adapted weight replaced by W + scale * A @ B (a new tree)."""
  merged = jax.tree.map(lambda x: x, params)
  for path, ab in _walk_adapters(adapters):
    w = _get(params, path)
    _set(merged, path, w + delta(target_name(path), ab["a"], ab["b"], scale).astype(w.dtype))
  return merged


def _walk_adapters(tree: dict, path=()):
  if set(tree) == {"a", "b"} and not isinstance(tree["a"], dict):
    yield path, tree
    return
  for k, v in tree.items():
    yield from _walk_adapters(v, path + (k,))


def apply(stage, cfg: LoraConfig, seed: int = 0):
  """`stage` trained through adapters: the base parameters become `frozen["base"]`."""
  base = stage.initial_model()
  params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
  frozen = dict(stage.frozen or {}, base=params)
  return dataclasses.replace(
      stage, initial_model=lambda: base, frozen=frozen,
      trainable=lambda model: init_adapters(params, cfg, seed),
      model_params=lambda adapters, frozen: merge_params(frozen["base"], adapters, cfg.scale))


def _run_config(path: str) -> dict:
  with open(os.path.join(path, "run_config.json")) as f:
    return json.load(f)


def load_policy(path: str) -> Transformer:
  """The model a workdir or HF directory holds; a LoRA workdir's adapters are merged into its
  base (`init_from`, vocabulary grown as the run grew it) with its trained router biases; a PPO
  workdir's policy is its value model's trunk."""
  if head_kind(path) == "value":
    return load_scored_model(path, "value").trunk
  is_lora = (os.path.exists(os.path.join(path, "run_config.json"))
             and (_run_config(path).get("lora") or {}).get("rank"))
  if not is_lora:
    return load_model(path)
  run_config = _run_config(path)
  cfg = LoraConfig(**run_config["lora"])
  base = load_model(run_config["init_from"])
  vocab = run_config["model"]["vocab_size"]
  if vocab > base.cfg.vocab_size:
    base = grow_vocab(base, vocab)
  params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
  extra = nnx.to_pure_dict(nnx.state(base, nnx.Not(nnx.Param)))
  shapes = jax.eval_shape(lambda: init_adapters(params, cfg))
  restored = restore_weights(path, dict(params=shapes, extra=extra))
  merged = merge_params(params, restored["params"], cfg.scale)
  # Parameters and router biases share top-level keys (moe_layers): replace each state apart.
  for kind, values in ((nnx.Param, merged), (nnx.Not(nnx.Param), restored["extra"])):
    state = nnx.state(base, kind)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(base, state)
  if run_config["model"]["max_seq_len"] != base.cfg.max_seq_len:  # The run's context override.
    base = with_config(base, base.cfg.replace(max_seq_len=run_config["model"]["max_seq_len"]))
  return base


def merge(workdir: str, out: str, hf_format: bool = False) -> None:
  """Writes the merged model of LoRA workdir `workdir` to `out`: a weights-only workdir that
  load_model and every stage read, or with `hf_format` a HF directory."""
  model = load_policy(workdir)
  if hf_format:
    from model import hf
    hf.save_pretrained(model, out)
    return
  run_config = {k: v for k, v in _run_config(workdir).items() if k != "lora"}
  run_config["merged_from"] = os.path.abspath(workdir)
  save_weights(out, model, run_config)
  for name in ("tokenizer.model", "tokenizer.json"):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
  load_tokenizer(out)  # The exported directory is complete.


def main(argv):
  if len(argv) != 2 or argv[1] != "merge":
    raise SystemExit("usage: python -m posttrain.lora merge --workdir=DIR --out=OUT [--hf]")
  from train.metrics import quiet_logging
  quiet_logging()
  merge(_WORKDIR.value, _OUT.value, _HF.value)
  print(f"merged {_WORKDIR.value} into {_OUT.value}", flush=True)


if __name__ == "__main__":
  from absl import app, flags
  _WORKDIR = flags.DEFINE_string("workdir", None, "A LoRA workdir.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Where to write the merged model.", required=True)
  _HF = flags.DEFINE_bool("hf", False, "Write a HF directory instead of a workdir.")
  app.run(main)
