"""Supervised fine-tuning in the chat format: the no-flag default of posttrain.sft.

  python -m posttrain.sft --config=configs/sft.py --workdir=workdir/sft \
      --config.init_from=workdir/pretrain
  python -m posttrain.sft --config=configs/sft.py:lora --workdir=workdir/sft_lora \
      --config.init_from=/path/to/hf_dir --config.data.source=jsonl --config.data.paths=train.jsonl

The built-in data is the task families' worked solutions (train split) rendered as chats.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # Required: a pre-training (or SFT) workdir or a HF directory.
  # Execution fields over the loaded model's config (its weight shapes are kept).
  c.model_overrides = ml_collections.ConfigDict(dict(
      dtype="float32", remat_policy="none", attention_impl="auto", moe_impl="auto",
      moe_dispatch="auto"))
  c.data = ml_collections.ConfigDict(dict(
      source="builtin",  # Or "jsonl": {"messages": [...]} or {"prompt", "completion"} per line.
      paths="",  # Comma-separated JSONL files (source=jsonl).
      eval_paths="",  # Held-out JSONL files for eval_loss; builtin: the tasks' test split.
      tasks="arithmetic,countdown",  # Built-in task families.
      builtin_examples=6000,  # Per task family.
      eval_examples=64,  # Per task family (builtin).
      seq_len=128, batch_size=8, seed=0,
      truncation="truncate"))  # Examples longer than seq_len + 1: "truncate" (keep the head) or "drop".
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,  # 0: full fine-tuning; > 0: LoRA adapters of this rank, the base frozen.
      alpha=16.0,
      targets="q_a,q_b,kv_a,kv_b,o",  # Projections by name (posttrain/lora.py lists them).
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      peak_lr=1e-3, end_lr_fraction=0.1, warmup_steps=20, schedule="cosine", decay_fraction=0.2,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  c.step = ml_collections.ConfigDict(dict(
      mtp_weight=0.1, mtp_weight_final=0.1, mtp_switch_step=0,  # Keeps the MTP head in step.
      balance_weight=1e-4, bias_gamma=1e-3, bias_gamma_stop_step=0,
      microbatches=1, spike_zscore=0.0, spike_window=32))
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1))
  c.max_bad_steps = 4
  c.total_steps = 300
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.eval_every = 100
  c.eval_batches = 4
  c.peak_flops = 0.0
  if arg == "lora":
    c.lora.rank = 8
    c.optimizer.peak_lr = 3e-3
  elif arg:
    raise ValueError(f"configs/sft.py: unknown variant {arg!r}; known: lora")
  return c
