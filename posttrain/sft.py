"""Supervised fine-tuning: the language-model loss on assistant tokens of chat examples, through
the one training loop (train.loop.run).

  python -m posttrain.sft --config=configs/sft.py --workdir=workdir/sft \
      --config.init_from=workdir/pretrain

`init_from` is a pre-training workdir, an earlier post-training workdir or a HF directory; its
tokenizer gains the chat tokens (written to DIR/tokenizer.*) and its vocabulary grows to fit them.
Examples are packed without being cut (posttrain/data.py); LoRA with `--config.lora.rank=R`.
Re-running the same command resumes.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from posttrain import lora
from posttrain.chat import encode_chat
from posttrain.data import PackedBatches, fixed_batches, prepare, read_chat_jsonl
from posttrain.start import load_chat_model, tokenizer_record
from posttrain.tasks import get_task, task_names
from train.checkpoint import check_run_config
from train.loop import Stage, loop_fields, run, run_model_fields


def task_chats(tasks: str, split: str, count: int, seed: int) -> list[list[dict]]:
  """The worked reference solutions of `count` problems of each comma-separated task family, as
  user/assistant chats."""
  chats = []
  for name in task_names(tasks):
    for p in get_task(name).problems(split, count, seed):
      chats.append([{"role": "user", "content": p.prompt},
                    {"role": "assistant", "content": p.solution}])
  if not chats:
    raise ValueError(f"config.data.tasks names no task family: {tasks!r}")
  return chats


def _chats(d, split: str) -> list[list[dict]]:
  """The configured train or held-out chats (empty when there are no held-out ones)."""
  if d.source == "builtin":
    if split == "train":
      return task_chats(d.tasks, "train", d.builtin_examples, d.seed)
    return task_chats(d.tasks, "test", d.eval_examples, d.seed) if d.eval_examples else []
  if d.source != "jsonl":
    raise ValueError(f"config.data.source must be 'builtin' or 'jsonl', got {d.source!r}")
  paths = d.paths if split == "train" else d.eval_paths
  if split == "train" and not paths:
    raise ValueError("config.data.source='jsonl' needs config.data.paths")
  return [chat for p in paths.split(",") if p.strip() for chat in read_chat_jsonl(p.strip())]


def sft_stage(c: ml_collections.ConfigDict, workdir: str) -> Stage:
  """The SFT stage: chat examples, the language-model loss on assistant tokens, full or LoRA."""
  if not c.init_from:
    raise ValueError("config.init_from is required: a pre-training workdir or a HF directory")
  os.makedirs(workdir, exist_ok=True)
  d = c.data
  base, tokenizer = load_chat_model(c.init_from, workdir, dict(c.model_overrides))
  cfg = base.cfg
  lora_cfg = lora.LoraConfig(**dict(c.lora))
  run_config = dict(model=run_model_fields(cfg), data=d.to_dict(), init_from=c.init_from,
                    tokenizer=tokenizer_record(tokenizer), lora=dataclasses.asdict(lora_cfg))
  if d.seq_len > cfg.max_seq_len:
    raise ValueError(f"config.data.seq_len {d.seq_len} exceeds the model's max_seq_len "
                     f"{cfg.max_seq_len}")
  encode = lambda chats: [encode_chat(tokenizer, m) for m in chats]
  examples = prepare(encode(_chats(d, "train")), d.seq_len + 1, d.truncation)
  shard = (jax.process_index(), jax.process_count())
  batches = PackedBatches(examples, d.seq_len, d.batch_size, d.seed, *shard)
  print(f"sft: {len(examples.tokens)} examples ({examples.truncated} truncated, {examples.dropped} "
        f"dropped: longer than {d.seq_len + 1} tokens), {batches.batches_per_epoch()} batches "
        f"per epoch", flush=True)
  held_out = _chats(d, "eval")
  eval_examples = prepare(encode(held_out), d.seq_len + 1, d.truncation) if held_out else None
  if eval_examples and c.eval_every:  # Too few held-out rows fail now, not at the first eval.
    fixed_batches(eval_examples, d.seq_len, d.batch_size, *shard)
  check_run_config(workdir, dict(run_config, **loop_fields(c)))  # Written once the inputs pass.
  stage = Stage(
      name="sft", cfg=cfg, run_config=run_config, batches=batches, batch_size=d.batch_size,
      tokens_per_batch=d.batch_size * d.seq_len, initial_model=lambda: base,
      eval_batches=(lambda: fixed_batches(eval_examples, d.seq_len, d.batch_size, *shard))
      if eval_examples else None,
      flops_per_token=cfg.flops_per_token(d.seq_len))
  return lora.apply(stage, lora_cfg) if lora_cfg.rank else stage


def sft(c: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) SFT; returns this invocation's logged metrics rows."""
  return run(sft_stage(c, workdir), c, workdir)


if __name__ == "__main__":
  from posttrain.cli import run_stage_cli
  run_stage_cli("sft", sft, lambda row: f"loss {row['loss']:.4f}")
