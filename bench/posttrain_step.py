"""Post-training step throughput: our SFT step against TRL's SFTTrainer.

The same config, random weights and batch of B rows x T tokens with a loss on the "assistant" part
of each row only (the last 3/4, as in a chat example): our jitted step (the SFT stage's loss,
AdamW) against SFTTrainer's training steps (PyTorch, eager, AdamW), both float32 on CPU. TRL is
a benchmark peer only: `pip install -e .[hf,peers]`; without it, only our step is timed and a
{"kind": "skipped"} line says why. Prints one JSON object per implementation, then the ratio.

  .venv/bin/python -m bench.posttrain_step --shape=bench-tiny --steps=5
"""

from __future__ import annotations

import json
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.jax_step import time_jax
from bench.shapes import bench_config
from model import hf
from model.config import ModelConfig

_SHAPE = flags.DEFINE_string("shape", "bench-tiny", "Benchmark shape (bench/shapes.py).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per implementation (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed TRL steps first (allocator, autograd).")


def assistant_mask(b: int, t: int) -> np.ndarray:
  """[B, T] weights: 0 on each row's first quarter (the prompt), 1 on the rest."""
  mask = np.ones((b, t), np.float32)
  mask[:, :t // 4] = 0
  return mask


def _tokenizer(vocab_size: int):
  """A word-level tokenizer object over the ids, with a pad token: SFTTrainer requires one even
  for a pre-tokenized dataset."""
  import tokenizers
  import transformers
  vocab = {f"t{i}": i for i in range(vocab_size)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def time_trl(cfg: ModelConfig, tokens: np.ndarray, mask: np.ndarray, steps: int,
             warmup: int) -> float:
  """Seconds per SFTTrainer optimizer step (the mean of `steps` after `warmup`), timed between
  its step-begin and step-end callbacks."""
  import datasets
  import torch
  import transformers
  import trl
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))).float()
  b, t = tokens.shape[0], tokens.shape[1] - 1
  # The first token is never predicted: TRL's assistant mask is over the inputs, ours over targets.
  rows = [dict(input_ids=tokens[i, :t + 1].tolist(),
               assistant_masks=[0] + mask[i].astype(int).tolist()) for i in range(b)]
  data = datasets.Dataset.from_list(rows * (warmup + steps))
  times = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.start)

  with tempfile.TemporaryDirectory() as out:
    args = trl.SFTConfig(
        output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=b,
        max_length=t + 1, packing=False, learning_rate=1e-3, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, bf16=False, fp16=False, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=_tokenizer(cfg.vocab_size), callbacks=[Timer()])
    trainer.train()
  return float(np.mean(times[warmup:]))


def main(argv):
  del argv
  cfg, (b, t) = bench_config(_SHAPE.value)
  tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  mask = assistant_mask(b, t)
  results = {"jax": time_jax(cfg, tokens, _STEPS.value, loss_mask=mask)}
  try:
    import trl  # noqa: F401
  except ImportError as e:
    print(json.dumps(dict(kind="skipped", impl="trl", reason=f"{e}; pip install -e .[hf,peers]")))
  else:
    results["trl"] = time_trl(cfg, tokens, mask, _STEPS.value, _WARMUP.value)
  for impl, seconds in results.items():
    print(json.dumps(dict(kind="step", stage="sft", shape=_SHAPE.value, impl=impl, batch=b,
                          seq_len=t, seconds_per_step=seconds, tokens_per_sec=b * t / seconds,
                          loss_tokens=int(mask.sum()))), flush=True)
  if "trl" in results:
    print(json.dumps(dict(kind="ratio", stage="sft", shape=_SHAPE.value,
                          ours_over_trl=results["trl"] / results["jax"])), flush=True)


if __name__ == "__main__":
  app.run(main)
