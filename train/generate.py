"""`python -m train.generate`: stream a continuation from a checkpoint (model.generate.stream).

  python -m train.generate --checkpoint=workdir/pretrain --prompt="12 + 7 ="
  python -m train.generate --checkpoint=/path/to/hf_dir --prompt="..." --temperature=0.7 --top_p=0.9

A pre-training workdir (its latest checkpoint and tokenizer) or a HF directory (config.json,
safetensors, tokenizer.json); stops at EOS.
"""

from __future__ import annotations

import sys

import jax

from model.generate import stream
from model.sampling import SamplingConfig
from train.checkpoint import load_model
from train.tokenizer import load_tokenizer


def _define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "A pre-training workdir or a HF checkpoint directory.")
  flags.DEFINE_string("prompt", None, "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens; 0: all.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1: all.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_enum("cache", "latent", ["latent", "expanded"], "KV cache layout.")
  flags.mark_flags_as_required(["checkpoint", "prompt"])


def main(argv):
  """Loads a checkpoint and its tokenizer, then streams the continuation of --prompt to stdout."""
  del argv
  from absl import flags
  from train.metrics import quiet_logging
  quiet_logging()
  f = flags.FLAGS
  model, tokenizer = load_model(f.checkpoint), load_tokenizer(f.checkpoint)
  prompt = [tokenizer.bos_id] + tokenizer.encode(f.prompt)
  sampling = SamplingConfig(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                            max_new_tokens=f.max_new_tokens, stop_tokens=(tokenizer.eos_id,),
                            pad_token=tokenizer.pad_id)
  sys.stdout.write(f.prompt)
  generated, shown = [], ""
  for token in stream(model, prompt, jax.random.key(f.seed), sampling, cache_kind=f.cache):
    if token == tokenizer.eos_id:
      break
    generated.append(token)
    # Held back while the text ends in an incomplete UTF-8 sequence (byte-fallback pieces).
    text = tokenizer.decode(generated).rstrip("\ufffd")
    if text.startswith(shown):
      sys.stdout.write(text[len(shown):])
      sys.stdout.flush()
      shown = text
  text = tokenizer.decode(generated)
  sys.stdout.write((text[len(shown):] if text.startswith(shown) else "") + "\n")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
