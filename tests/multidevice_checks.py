"""Sharded training on 8 host CPU devices against one device; run in its own process by
tests/test_sharding.py (XLA_FLAGS must be set before JAX is imported):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice_checks OUT.json

Writes one JSON object: per mesh the loss and parameter differences of two sharded train steps to
the single-device ones, the parameters whose sharding differs from the table, and the planner's
bytes beside XLA's memory analysis; the expert-parallel MoE against the unsharded layer; the
"modules" init's shardings; the Pallas kernels under a mesh.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from model import sharding
from model.moe import MoE
from model.transformer import forward, init_model
from tests.conftest import small_config
from train import memory, optimizer as opt
from train.parallel import create_sharded_state, jit_train_step, put_batch
from train.step import StepConfig, create_train_state, make_train_step

MESHES = {"data8": dict(data=8), "fsdp8": dict(data=1, fsdp=8),
          "data2_expert4": dict(data=2, expert=4), "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2)}
# Hand-written expectations for a few parameters (the stacked layer axis first).
EXPECTED = {"fsdp2_expert2_tensor2": {
    ("moe_layers", "ffn", "w_gate"): P(None, "expert", "fsdp", "tensor"),
    ("moe_layers", "ffn", "w_down"): P(None, "expert", "tensor", "fsdp"),
    ("moe_layers", "attn", "o", "w"): P(None, "tensor", None, ("fsdp", "expert")),
    ("moe_layers", "attn", "kv_b", "w"): P(None, "fsdp", "tensor"),
    ("embed", "embedding"): P("tensor", ("fsdp", "expert")),
    ("dense_layers", "ffn", "gate", "w"): P(None, ("fsdp", "expert"), "tensor")},
    "data2_expert4": {("moe_layers", "ffn", "w_up"): P(None, "expert"),
                      ("moe_layers", "attn", "q_a", "w"): P(None, "expert")}}


def batch(cfg, b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  segments = np.ones((b, t), np.int32)
  segments[:, t // 2:] = 2
  positions = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segments,
              positions=positions.astype(np.int32), loss_mask=np.ones((b, t), np.float32))


def flat(tree):
  return {tuple(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def memory_comparison(compiled, cfg, sizes, batch_size, seq_len):
  """The planner's per-device bytes next to XLA's memory analysis of the compiled step."""
  analysis = compiled.memory_analysis()
  planned = memory.plan(cfg, sizes, batch_size, seq_len)
  return dict(xla_arguments=analysis.argument_size_in_bytes, xla_temp=analysis.temp_size_in_bytes,
              xla_outputs=analysis.output_size_in_bytes, xla_alias=analysis.alias_size_in_bytes,
              plan_arguments=planned["params"] + planned["extra"] + planned["optimizer"]
              + planned["batch"],
              plan_temp=planned["gradients"] + planned["activations"])


def train_step_checks(cfg, data):
  tx = opt.make_optimizer(opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10))
  step_cfg = StepConfig(spike_zscore=0.0)
  template, state0 = create_train_state(init_model(cfg, seed=0), tx)
  ref_step = jax.jit(make_train_step(template, tx, step_cfg))
  ref_state = state0
  for _ in range(2):  # Two steps: the first has learning rate 0 (warmup).
    ref_state, ref_metrics = ref_step(ref_state, jax.tree.map(jnp.asarray, data))
  ref_params, init_params = flat(ref_state.params), flat(state0.params)
  results = {}
  for name, sizes in MESHES.items():
    tick = time.perf_counter()
    mesh = sharding.make_mesh(sharding.MeshConfig(**sizes))
    template, state, shardings = create_sharded_state(cfg, tx, mesh, seed=0)
    init_diff = max_diff(init_params, flat(state.params))
    step = jit_train_step(make_train_step(template, tx, step_cfg), shardings, mesh, 8)
    global_batch = put_batch(data, mesh, 8)
    compiled = step.lower(state, global_batch).compile()
    for _ in range(2):
      state, metrics = compiled(state, global_batch)
    params = flat(state.params)
    wrong = []
    for path, leaf in params.items():
      want = sharding.logical_to_spec(sharding.param_axes(path, leaf.ndim), leaf.shape, mesh)
      want = EXPECTED.get(name, {}).get(path, want)
      if leaf.sharding.spec != want:
        wrong.append(f"{'/'.join(path)}: {leaf.sharding.spec} != {want}")
    sharded_moments = sum(1 for v in jax.tree.leaves(state.opt_state)
                          if not v.sharding.is_fully_replicated)
    results[name] = dict(
        init_diff=init_diff, loss=float(metrics["loss"]), ref_loss=float(ref_metrics["loss"]),
        loss_diff=abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
        param_diff=max_diff(ref_params, params), wrong_shardings=wrong,
        sharded_params=sum(1 for v in params.values() if not v.sharding.is_fully_replicated),
        sharded_opt_leaves=sharded_moments,
        dropped=int(metrics["dropped_tokens"]), ref_dropped=int(ref_metrics["dropped_tokens"]),
        memory=memory_comparison(compiled, cfg, dict(mesh.shape), 8, 16),
        seconds=time.perf_counter() - tick)
  return results


def moe_checks(cfg):
  """The MoE layer alone (a non-zero router bias), jitted under expert-parallel meshes against no
  mesh, with both dispatches (ragged emulated on CPU): dropless must match, in value and (ragged)
  gradient; a small capacity must drop and count."""
  out = {}
  x = jax.random.normal(jax.random.key(1), (8, 16, cfg.d_model), jnp.float32)
  both = ("data2_expert4", "fsdp2_expert2_tensor2")
  for capacity_factor, names in ((None, both), (0.5, ("data2_expert4",))):
    for dispatch in ("all_to_all", "ragged"):
      c = cfg.replace(capacity_factor=capacity_factor, moe_dispatch=dispatch)
      graphdef, state = nnx.split(MoE(c, rngs=nnx.Rngs(3)))
      bias = state["router"]["bias"]
      bias.set_value(0.05 * jnp.arange(bias.shape[0], dtype=jnp.float32) % 0.2)
      run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
      grad = jax.jit(jax.grad(lambda s, x: (nnx.merge(graphdef, s)(x)[0] ** 2).sum()))
      ref_y, ref_stats = run(state, x)
      with_grad = dispatch == "ragged" and capacity_factor is None
      ref_g = flat(nnx.to_pure_dict(grad(state, x))) if with_grad else None
      for name in names:
        with jax.set_mesh(sharding.make_mesh(sharding.MeshConfig(**MESHES[name]))):
          y, stats = run(state, x)
          g = flat(nnx.to_pure_dict(grad(state, x))) if with_grad and name == both[0] else None
        out[f"{name}/{dispatch}/capacity={capacity_factor}"] = dict(
            y_diff=float(jnp.max(jnp.abs(y - ref_y))), dropped=int(stats.dropped),
            ref_dropped=int(ref_stats.dropped), grad_diff=None if g is None else max_diff(ref_g, g))
  return out


def modules_init_checks(cfg):
  """`init="modules"` (each parameter drawn by its module's initialiser in its own sharding)."""
  tx = opt.make_optimizer(opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10))
  mesh = sharding.make_mesh(sharding.MeshConfig(**MESHES["fsdp2_expert2_tensor2"]))
  _, state, _ = create_sharded_state(cfg, tx, mesh, seed=0, init="modules")
  wrong, stds = [], []
  for path, leaf in flat(state.params).items():
    want = sharding.logical_to_spec(sharding.param_axes(path, leaf.ndim), leaf.shape, mesh)
    if leaf.sharding.spec != want:
      wrong.append(f"{'/'.join(path)}: {leaf.sharding.spec} != {want}")
    if path[-1] != "scale":
      stds.append(float(np.std(np.asarray(leaf))))
  return dict(wrong_shardings=wrong, min_std=min(stds), max_std=max(stds))


def pallas_attention_check(cfg):
  """The model with the Pallas kernels (flash attention, grouped matmul; interpreted on CPU) under
  a mesh: they run inside the per-device shard_maps and match the XLA reference without a mesh."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16)), jnp.int32)
  ref = forward(init_model(cfg.replace(attention_impl="xla")), tokens).logits
  with jax.set_mesh(sharding.make_mesh(sharding.MeshConfig(**MESHES["fsdp2_expert2_tensor2"]))):
    out = forward(init_model(cfg.replace(attention_impl="pallas", moe_impl="pallas")),
                  tokens).logits
  return dict(logits_diff=float(jnp.max(jnp.abs(out - ref))))


def microbatch_check(cfg):
  """Gradient accumulation (2 micro-batches) on {data 2, expert 4} against one device."""
  tx = opt.make_optimizer(opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10))
  step_cfg = StepConfig(spike_zscore=0.0, microbatches=2)
  data = batch(cfg, b=16, seed=1)
  template, state = create_train_state(init_model(cfg, seed=0), tx)
  ref_step = jax.jit(make_train_step(template, tx, step_cfg))
  mesh = sharding.make_mesh(sharding.MeshConfig(**MESHES["data2_expert4"]))
  template, sharded, shardings = create_sharded_state(cfg, tx, mesh, seed=0)
  step = jit_train_step(make_train_step(template, tx, step_cfg), shardings, mesh, 16)
  for _ in range(2):
    state, ref_metrics = ref_step(state, jax.tree.map(jnp.asarray, data))
    sharded, metrics = step(sharded, put_batch(data, mesh, 16))
  return dict(loss_diff=abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
              param_diff=max_diff(flat(state.params), flat(sharded.params)))


def generation_check(cfg):
  """Greedy generation on {data 2, expert 2, tensor 2} against one device; the latent cache's
  batch axis is sharded over the batch mesh axes."""
  from model.generate import generate, jitted_prefill, pad_prompts
  from model.sampling import SamplingConfig
  model = init_model(cfg, seed=2)
  prompts = [[5, 9, 13, 2, 40, 7], [11, 3], [60, 1, 22, 8], [7]] * 2
  tokens, lengths = pad_prompts(prompts)
  sampling = SamplingConfig(max_new_tokens=5)
  ref = generate(model, tokens, lengths, jax.random.key(0), sampling)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=2, tensor=2))
  with jax.set_mesh(mesh):
    out = generate(model, tokens, lengths, jax.random.key(0), sampling)
    _, cache = jitted_prefill(model, tokens, lengths, max_len=11, kind="latent")
  return dict(tokens_equal=bool((out.tokens == ref.tokens).all()),
              logprob_diff=float(jnp.max(jnp.abs(out.logprobs - ref.logprobs))),
              cache_spec=str(cache.stacks[1].first.sharding.spec))


def main(path):
  assert jax.device_count() == 8, jax.devices()
  cfg = small_config(vocab_size=64, num_layers=2, mtp_depth=0)
  tick = time.perf_counter()
  results = dict(moe=moe_checks(cfg))
  results["moe_seconds"] = time.perf_counter() - tick
  results["train_step"] = train_step_checks(cfg, batch(cfg))
  results["modules_init"] = modules_init_checks(cfg)
  results["pallas_attention"] = pallas_attention_check(cfg)
  results["microbatches"] = microbatch_check(cfg)
  results["generation"] = generation_check(cfg)
  results["seconds"] = time.perf_counter() - tick
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main(sys.argv[1])
