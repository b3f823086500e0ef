"""Supervised fine-tuning in the chat format: the no-flag default of posttrain.sft.

  python -m posttrain.sft --config=configs/sft.py --workdir=workdir/sft \
      --config.init_from=workdir/pretrain
  python -m posttrain.sft --config=configs/sft.py:lora --workdir=workdir/sft_lora \
      --config.init_from=/path/to/hf_dir --config.data.source=jsonl --config.data.paths=train.jsonl

The built-in data is the task families' worked solutions (train split) rendered as chats.
`:judge` trains the built-in AI-feedback judge (posttrain/judge.py) with a 256-token context.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # Required: a pre-training (or SFT) workdir or a HF directory.
  c.model_overrides = common.model_overrides()
  c.data = ml_collections.ConfigDict(dict(
      source="builtin",  # Or "jsonl": {"messages": [...]} or {"prompt", "completion"} per line.
      paths="",  # Comma-separated JSONL files (source=jsonl).
      eval_paths="",  # Held-out JSONL files for eval_loss; builtin: the tasks' test split.
      tasks="arithmetic,countdown",  # Built-in task families.
      builtin_examples=6000,  # Per task family.
      eval_examples=64,  # Per task family (builtin).
      seq_len=128, batch_size=8, seed=0,
      # Examples longer than seq_len + 1: "truncate" (keep the head; one whose head holds no
      # assistant token is dropped) or "drop". Both are counted and printed.
      truncation="truncate"))
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,  # 0: full fine-tuning; > 0: LoRA adapters of this rank, the base frozen.
      alpha=16.0,
      targets="q_a,q_b,kv_a,kv_b,o",  # Projections by name (posttrain/lora.py lists them).
  ))
  c.optimizer = common.optimizer(peak_lr=1e-3, weight_decay=0.0)
  # The MTP head trained along (weight 0.1 throughout); no spike guard on short runs.
  c.step = common.step(mtp_weight=0.1, mtp_weight_final=0.1, mtp_switch_step=0, spike_zscore=0.0)
  c.mesh = common.mesh()
  common.add_loop(c, total_steps=600, checkpoint_every=200, keep_checkpoints=2)
  if arg == "lora":
    c.lora.rank = 8
    c.optimizer.peak_lr = 3e-3
  elif arg == "judge":  # The built-in judge (posttrain/judge.py) on `judge data`'s JSONL.
    c.data.update(source="jsonl", seq_len=256, batch_size=8)
    c.model_overrides.max_seq_len = 256  # A judge question holds two responses.
    c.optimizer.update(peak_lr=3e-4, warmup_steps=20)
    c.total_steps, c.eval_every = 2000, 0
  elif arg:
    raise ValueError(f"configs/sft.py: unknown variant {arg!r}; known: judge, lora")
  return c
