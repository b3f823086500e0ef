"""Decode throughput: the absorbed latent cache against an expanded per-head K/V cache and against
transformers' `generate` on the same weights (greedy, float32, CPU). One JSON object per result.

  .venv/bin/python bench/generate.py --batches=1,32 --contexts=128,2048 --new_tokens=32

Decode tokens/s counts only the decode phase: for our paths the jitted decode loop is timed apart
from the prefill; for transformers, generate(new_tokens) minus generate(1), which is its prefill.
"""

from __future__ import annotations

import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.shapes import SHAPES, bench_config
from model import hf
from model.config import get_preset
from model.decode import cache_bytes_per_token
from model.generate import decode_loop, jitted_prefill
from model.sampling import SamplingConfig
from model.transformer import init_model

_SHAPE = flags.DEFINE_enum("shape", "bench-small", list(SHAPES), "Model shape (DESIGN.md).")
_BATCHES = flags.DEFINE_list("batches", ["1", "32"], "Batch sizes.")
_CONTEXTS = flags.DEFINE_list("contexts", ["128", "2048"], "Prompt lengths.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens decoded per row.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers' generate.")
_ATTENTION = flags.DEFINE_string("attention_impl", "auto",
                                  "ModelConfig.attention_impl (prefill): auto, xla, chunked, native.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per path (the fastest is reported).")


def time_ours(model, prompts: np.ndarray, new_tokens: int, kind: str):
  """(prefill seconds, decode seconds, tokens [B, new]): the fastest of `_ROUNDS` after a compiling
  warm-up (the machine is shared; the minimum is the least disturbed)."""
  b, t = prompts.shape
  tokens, lengths = jnp.asarray(prompts), jnp.full((b,), t, jnp.int32)
  sampling = SamplingConfig(max_new_tokens=new_tokens)
  max_len = t + new_tokens
  prefills, decodes = [], []
  for _ in range(1 + _ROUNDS.value):
    start = time.perf_counter()
    logits, cache = jitted_prefill(model, tokens, lengths, max_len=max_len, kind=kind)
    jax.block_until_ready(logits)
    prefilled = time.perf_counter()
    out, _ = decode_loop(model, cache, logits, jax.random.key(0), sampling)
    jax.block_until_ready(out.tokens)
    prefills.append(prefilled - start)
    decodes.append(time.perf_counter() - prefilled)
  return min(prefills[1:]), min(decodes[1:]), np.asarray(out.tokens)


def time_torch(model_dir: str, prompts: np.ndarray, new_tokens: int):
  """(decode seconds, tokens [B, new]) of transformers' greedy generate with its KV cache: the
  fastest generate(new_tokens) minus the fastest generate(1) over `_ROUNDS` rounds each."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
  inputs = torch.tensor(prompts, dtype=torch.long)

  def run(n):
    start = time.perf_counter()
    with torch.no_grad():
      out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, out[:, prompts.shape[1]:].numpy()

  run(2)  # Warm-up.
  prefill_only = min(run(1)[0] for _ in range(_ROUNDS.value))
  timed = [run(new_tokens) for _ in range(_ROUNDS.value)]
  return min(s for s, _ in timed) - prefill_only, timed[0][1]


def main(argv):
  del argv
  v3 = get_preset("deepseek_v3_671b").replace(dtype="bfloat16")
  latent, expanded = cache_bytes_per_token(v3, "latent"), cache_bytes_per_token(v3, "expanded")
  mha = 2 * v3.num_heads * v3.v_head_dim * v3.num_layers * 2  # K and V, 128 heads of 128, bf16.
  print(json.dumps(dict(kind="cache_bytes_per_token", preset="deepseek_v3_671b", dtype="bfloat16",
                        latent=latent, multi_head_attention=mha, smaller_by=1 - latent / mha,
                        expanded_mla_layout=expanded, latent_smaller_than_expanded=1 - latent / expanded)),
        flush=True)
  contexts = [int(c) for c in _CONTEXTS.value]
  cfg, _ = bench_config(_SHAPE.value)
  cfg = cfg.replace(max_seq_len=max(contexts) + _NEW.value, attention_impl=_ATTENTION.value)
  model = init_model(cfg, seed=0)
  model_dir = tempfile.mkdtemp()
  if _TORCH.value:
    hf.save_pretrained(model, model_dir)
  for b in (int(x) for x in _BATCHES.value):
    for t in contexts:
      prompts = np.random.default_rng(t).integers(1, cfg.vocab_size, (b, t)).astype(np.int32)
      rates, outputs = {}, {}
      for kind in ("latent", "expanded"):
        prefill_s, decode_s, outputs[kind] = time_ours(model, prompts, _NEW.value, kind)
        rates[kind] = b * _NEW.value / decode_s
        print(json.dumps(dict(kind="decode", shape=_SHAPE.value, impl=kind,
                              attention_impl=_ATTENTION.value, batch=b, context=t,
                              new_tokens=_NEW.value, prefill_seconds=prefill_s,
                              decode_seconds=decode_s, decode_tokens_per_sec=rates[kind],
                              cache_bytes=cache_bytes_per_token(cfg, kind) * b * (t + _NEW.value))),
              flush=True)
      if _TORCH.value:
        decode_s, outputs["torch"] = time_torch(model_dir, prompts, _NEW.value)
        rates["torch"] = b * _NEW.value / decode_s
        print(json.dumps(dict(kind="decode", shape=_SHAPE.value, impl="transformers", batch=b,
                              context=t, new_tokens=_NEW.value, decode_seconds=decode_s,
                              decode_tokens_per_sec=rates["torch"])), flush=True)
      ratio = dict(kind="ratio", batch=b, context=t,
                   latent_over_expanded=rates["latent"] / rates["expanded"],
                   greedy_tokens_equal_expanded=float(np.mean(outputs["latent"] == outputs["expanded"])))
      if "torch" in rates:
        ratio.update(latent_over_transformers=rates["latent"] / rates["torch"],
                     greedy_tokens_equal_transformers=float(np.mean(outputs["latent"] == outputs["torch"])))
      print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
  app.run(main)
