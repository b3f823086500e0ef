"""MoE scaling: does the cost stay flat as experts are added at a fixed top-k?

Two measurements over num_experts in --experts (top-k fixed at 2, bench-tiny otherwise):
- the whole jitted train step of our model (forward, backward, AdamW), and
- the routed-expert layer alone, forward + backward: ours (tokens sorted by expert, grouped
  matmul, model/moe.py:dropless_ffn) against a dense one-hot baseline that runs every token
  through every expert and weights the outputs by the (mostly zero) [T, E] gate matrix, the cost
  that grows with E which sparse dispatch exists to avoid.
Prints one JSON object per measurement, then the ratios from the fewest to the most experts
(goal: at most 1.3x for our step).
  .venv/bin/python -m bench.moe_scaling --experts=8,16,32,64 --steps=5
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.jax_step import time_jax
from bench.shapes import bench_config
from model.moe import dropless_ffn

_EXPERTS = flags.DEFINE_list("experts", ["8", "16", "32", "64"], "Routed expert counts.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per measurement (after a warm-up).")
_SHAPE = flags.DEFINE_string("shape", "bench-tiny", "Benchmark shape (bench/shapes.py).")


def dense_onehot_ffn(x_TD, experts_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Every expert on every token, combined by the dense gate matrix (zero off the top-k)."""
  gates_TE = jnp.zeros((x_TD.shape[0], w_gate_EDF.shape[0]), jnp.float32)
  gates_TE = gates_TE.at[jnp.arange(x_TD.shape[0])[:, None], experts_TK].set(weights_TK)
  h_ETF = (jax.nn.silu(jnp.einsum("TD,EDF->ETF", x_TD, w_gate_EDF))
           * jnp.einsum("TD,EDF->ETF", x_TD, w_up_EDF))
  y_ETD = jnp.einsum("ETF,EFD->ETD", h_ETF, w_down_EFD)
  return jnp.einsum("ETD,TE->TD", y_ETD, gates_TE), jnp.zeros((), jnp.int32)


def layer_inputs(tokens: int, d: int, f: int, e: int, k: int):
  """Random (x, experts, gate weights, w_gate, w_up, w_down), each token's k experts distinct."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
  experts = jnp.asarray(np.argsort(rng.random((tokens, e)), axis=1)[:, :k], jnp.int32)
  weights = jnp.asarray(rng.random((tokens, k)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=s) * 0.02, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
  return x, experts, weights, ws


def time_layer(ffn, tokens: int, d: int, f: int, e: int, k: int, steps: int) -> float:
  """Seconds per jitted forward + backward (gradients of x and the three weights) of `ffn`, after
  checking that its output equals dropless_ffn's."""
  x, experts, weights, ws = layer_inputs(tokens, d, f, e, k)
  np.testing.assert_allclose(np.asarray(ffn(x, experts, weights, *ws)[0]),
                             np.asarray(dropless_ffn(x, experts, weights, *ws)[0]),
                             rtol=1e-4, atol=1e-6)

  def loss(x, *ws):
    return ffn(x, experts, weights, *ws)[0].sum()

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  jax.block_until_ready(grad(x, *ws))
  start = time.perf_counter()
  for _ in range(steps):
    out = grad(x, *ws)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  base, (b, t) = bench_config(_SHAPE.value)
  tokens = np.random.default_rng(0).integers(0, base.vocab_size, (b, t + 1)).astype(np.int32)
  counts = [int(e) for e in _EXPERTS.value]
  results = {"step": {}, "layer_ours": {}, "layer_dense_onehot": {}}
  for e in counts:
    cfg = dataclasses.replace(base, num_experts=e)
    seconds = time_jax(cfg, tokens, _STEPS.value)
    results["step"][e] = seconds
    print(json.dumps(dict(kind="moe_step", shape=_SHAPE.value, num_experts=e,
                          experts_per_token=cfg.experts_per_token, seconds_per_step=seconds,
                          tokens_per_sec=b * t / seconds, params=cfg.param_counts()["total"])),
          flush=True)
    for impl, ffn in (("ours", dropless_ffn), ("dense_onehot", dense_onehot_ffn)):
      seconds = time_layer(ffn, b * t, cfg.d_model, cfg.moe_ffn_dim, e, cfg.experts_per_token,
                           _STEPS.value)
      results[f"layer_{impl}"][e] = seconds
      print(json.dumps(dict(kind="moe_layer", impl=impl, num_experts=e, tokens=b * t,
                            seconds_fwd_bwd=seconds)), flush=True)
  lo, hi = counts[0], counts[-1]
  print(json.dumps(dict(kind="ratio", measure=f"seconds at {hi} experts / at {lo}",
                        step=results["step"][hi] / results["step"][lo],
                        layer_ours=results["layer_ours"][hi] / results["layer_ours"][lo],
                        layer_dense_onehot=(results["layer_dense_onehot"][hi]
                                            / results["layer_dense_onehot"][lo]),
                        goal_step=1.3)), flush=True)


if __name__ == "__main__":
  app.run(main)
