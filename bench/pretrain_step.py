"""Training-step throughput: our jitted step against transformers' PyTorch DeepseekV3ForCausalLM.

Both do forward, backward and AdamW on the same config, weights and batch (float32, CPU). Prints
one JSON object per (shape, implementation), then one with the ratio.

  .venv/bin/python bench/pretrain_step.py --shapes=bench-tiny,bench-medium --steps=5
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from model import hf
from bench.jax_step import time_jax
from bench.shapes import bench_config
from model.config import ModelConfig
from train.metrics import measured_matmul_flops

_SHAPES = flags.DEFINE_list("shapes", ["bench-tiny", "bench-small", "bench-medium"], "Shapes to run.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per implementation (after one warm-up).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers' PyTorch model.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 keeps its default.")

def time_torch(cfg: ModelConfig, tokens: np.ndarray, steps: int) -> float:
  """Seconds per eager PyTorch step (forward, cross-entropy, backward, AdamW): the median of
  `steps`."""
  import torch
  import transformers
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))).float().train()
  optim = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
  inputs = torch.tensor(tokens[:, :-1], dtype=torch.long)
  targets = torch.tensor(tokens[:, 1:], dtype=torch.long)

  def one_step():
    logits = model(inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()

  one_step()
  times = []
  for _ in range(steps):  # As ours (bench/jax_step.py): the median of steps timed one by one.
    start = time.perf_counter()
    one_step()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  peak = measured_matmul_flops()
  print(json.dumps(dict(kind="peak", matmul_flops_per_sec=peak, device=jax.devices()[0].device_kind)))
  for name in _SHAPES.value:
    cfg, (b, t) = bench_config(name)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    flops_per_token = cfg.flops_per_token(t)
    results = {}
    impls = [("jax", time_jax)] + ([("torch", time_torch)] if _TORCH.value else [])
    for impl, fn in impls:
      seconds = fn(cfg, tokens, _STEPS.value)
      tps = b * t / seconds
      results[impl] = tps
      print(json.dumps(dict(kind="step", shape=name, impl=impl, batch=b, seq_len=t,
                            seconds_per_step=seconds, tokens_per_sec=tps,
                            mfu=flops_per_token * tps / peak, params=cfg.param_counts()["total"])),
            flush=True)
    if "torch" in results:
      print(json.dumps(dict(kind="ratio", shape=name, jax_over_torch=results["jax"] / results["torch"])),
            flush=True)


if __name__ == "__main__":
  app.run(main)
