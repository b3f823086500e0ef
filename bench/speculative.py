"""Speculative greedy decoding with the MTP module against plain greedy decoding, on a checkpoint
whose MTP head is trained (default: the built-in pre-training run of `make demo`).

Prompts are the first tokens of built-in corpus documents the run never trained on (another
corpus seed). Prints one JSON object per batch size: the fraction of drafts the main model
confirmed, tokens per main-model step, both paths' decode tokens/s (the fastest of --rounds after
a compiling call; prefill included in both) and whether the greedy tokens are identical.

  .venv/bin/python -m bench.speculative --checkpoint=workdir/demo/base --batches=1,32
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from model.generate import generate, pad_prompts, speculative_greedy
from model.sampling import SamplingConfig
from train.checkpoint import load_model
from train.corpus import document
from train.metrics import quiet_logging
from train.tokenizer import load_tokenizer

_CHECKPOINT = flags.DEFINE_string("checkpoint", "workdir/demo/base",
                                  "A pre-training workdir whose model has an MTP module.")
_BATCHES = flags.DEFINE_list("batches", ["1", "32"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 24, "Prompt tokens per row (a document's start).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens decoded per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per path (the fastest is reported).")
_SEED = flags.DEFINE_integer("corpus_seed", 12345, "Built-in corpus seed of the prompts.")


def _timed(fn, rounds: int):
  """(fastest seconds of `rounds` calls after a compiling one, the last result)."""
  out = jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best, out


def main(argv):
  del argv
  quiet_logging()
  if not os.path.isdir(_CHECKPOINT.value):
    raise SystemExit(f"bench.speculative: no checkpoint at {_CHECKPOINT.value!r}; run `make demo` "
                     "(its base stage) or pass --checkpoint=<pre-training workdir>")
  model, tokenizer = load_model(_CHECKPOINT.value), load_tokenizer(_CHECKPOINT.value)
  if model.cfg.mtp_depth < 1:
    raise SystemExit(f"bench.speculative: {_CHECKPOINT.value} has no MTP module (mtp_depth 0)")
  sampling = SamplingConfig(max_new_tokens=_NEW.value, stop_tokens=(),
                            pad_token=tokenizer.pad_id)
  for b in (int(x) for x in _BATCHES.value):
    rows = []
    for i in range(b):
      ids = [tokenizer.bos_id] + tokenizer.encode(document(_SEED.value, i))
      rows.append(ids[:_PROMPT.value])
    tokens, lengths = pad_prompts(rows)
    key = jax.random.key(0)
    plain_s, plain = _timed(lambda: generate(model, tokens, lengths, key, sampling), _ROUNDS.value)
    spec_s, (spec, stats) = _timed(
        lambda: speculative_greedy(model, tokens, lengths, sampling), _ROUNDS.value)
    made = int(np.asarray(spec.lengths).sum())
    print(json.dumps(dict(
        kind="speculative", checkpoint=_CHECKPOINT.value, batch=b, prompt_tokens=_PROMPT.value,
        new_tokens=_NEW.value,
        acceptance=float(stats.accepted.sum() / np.maximum(stats.steps.sum(), 1)),
        tokens_per_step=float((made - b) / np.maximum(stats.steps.sum(), 1)),
        plain_tokens_per_sec=made / plain_s, speculative_tokens_per_sec=made / spec_s,
        speedup=plain_s / spec_s,
        greedy_tokens_equal=float(np.mean(np.asarray(spec.tokens) == np.asarray(plain.tokens))))),
        flush=True)


if __name__ == "__main__":
  app.run(main)
