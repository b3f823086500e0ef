"""Config blocks every stage shares (one definition each): the device mesh, the optimizer, the
step's loss weights and guard, and the loop's cadence. A stage's config file starts from these
and states only what it changes."""

import ml_collections


def mesh() -> ml_collections.ConfigDict:
  """The device mesh (model/sharding.py): axis sizes within a slice, one of them -1 (the rest of
  the devices); dcn_* sizes multiply an axis across TPU slices or hosts (hybrid mesh)."""
  return ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1))


def model_overrides() -> ml_collections.ConfigDict:
  """Fields a post-training stage applies over the loaded model's config (its weight shapes are
  kept): dtype, remat and kernel choices, and the context length (no weight depends on it; 0
  keeps the loaded model's)."""
  return ml_collections.ConfigDict(dict(
      dtype="float32", remat_policy="none", layer_loop="auto", attention_impl="auto",
      moe_impl="auto", moe_dispatch="auto", max_seq_len=0))


def optimizer(**changes) -> ml_collections.ConfigDict:
  """AdamW with warm-up and a decay (train/optimizer.py's OptimizerConfig fields)."""
  fields = dict(peak_lr=3e-3, end_lr_fraction=0.1, warmup_steps=20, schedule="cosine",
                decay_fraction=0.2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
  return ml_collections.ConfigDict(_changed(fields, changes, "optimizer"))


def step(**changes) -> ml_collections.ConfigDict:
  """train/step.py's StepConfig: MTP weight schedule, balance loss, router-bias gamma, micro-batches
  and the loss-spike guard."""
  fields = dict(mtp_weight=0.3, mtp_weight_final=0.1, mtp_switch_step=240,  # V3: 0.3, then 0.1.
                balance_weight=1e-4, bias_gamma=1e-3, bias_gamma_stop_step=0,
                microbatches=1, spike_zscore=6.0, spike_window=32)
  return ml_collections.ConfigDict(_changed(fields, changes, "step"))


def add_loop(c: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  """Sets the loop's fields on `c` (train/loop.py reads them): steps, cadence, the bad-step guard
  and the FLOP/s for MFU; returns `c`."""
  fields = dict(
      max_bad_steps=4,  # Consecutive skipped steps that restore the last checkpoint; 0: never.
      total_steps=300, log_every=10, checkpoint_every=100, keep_checkpoints=3, eval_every=100,
      eval_batches=4,
      peak_flops=0.0)  # FLOP/s for MFU; 0: the device table, or a matmul measured at start-up.
  for key, value in _changed(fields, changes, "loop").items():
    setattr(c, key, value)
  return c


def add_rl_training(c: ml_collections.ConfigDict, peak_lr: float, log_every: int
                    ) -> ml_collections.ConfigDict:
  """The training blocks an RL stage's config shares (GRPO, PPO): a constant learning rate, no
  weight decay, the router biases frozen (gamma 0) and the MTP head left out (RL trains the
  policy's next token), no spike guard, the mesh, and the loop."""
  c.optimizer = optimizer(peak_lr=peak_lr, warmup_steps=0, end_lr_fraction=1.0, weight_decay=0.0)
  c.step = step(mtp_weight=0.0, mtp_weight_final=0.0, mtp_switch_step=0, bias_gamma=0.0,
                spike_zscore=0.0)
  c.mesh = mesh()
  return add_loop(c, total_steps=100, log_every=log_every, checkpoint_every=20,
                  keep_checkpoints=2, eval_every=0)


def preference_data(**changes) -> ml_collections.ConfigDict:
  """The preference-pair block the reward model and DPO share."""
  fields = dict(
      source="builtin",  # Or "jsonl": {"prompt", "chosen", "rejected"[, "label", "margin"]}.
      paths="", eval_paths="",  # Comma-separated JSONL files (source=jsonl).
      tasks="arithmetic,countdown",  # Built-in pairs: these task families.
      builtin_pairs=2000, eval_pairs=100,  # Per family (builtin).
      rejected_kinds="wrong,malformed,rambling",
      seq_len=128,  # Each side (prompt + response) right-padded to this many tokens.
      batch_size=8, seed=0, truncation="truncate")
  return ml_collections.ConfigDict(_changed(fields, changes, "data"))


def _changed(fields: dict, changes: dict, block: str) -> dict:
  unknown = sorted(set(changes) - set(fields))
  if unknown:
    raise ValueError(f"configs/common.py {block}: unknown fields {unknown}; known: {sorted(fields)}")
  return dict(fields, **changes)
