"""Pre-training on the built-in corpus with the tiny model: the no-flag default of train.pretrain.

  python -m train.pretrain --config=configs/pretrain.py --workdir=/tmp/run --config.total_steps=50

`--config=configs/pretrain.py:deepseek_v3` is DeepSeek-V3 671B on a TPU v5p-1024 mesh (README,
"Parallelism"); point `data` and `tokenizer` at real files.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0  # Model initialisation.
  c.model = ml_collections.ConfigDict(dict(preset="tiny"))
  # ModelConfig fields over the preset; the execution fields are listed so flags can set them.
  c.model_overrides = ml_collections.ConfigDict(dict(
      vocab_size=512, max_seq_len=128, dtype="float32", remat_policy="none", attention_impl="auto",
      moe_impl="auto", moe_dispatch="auto"))
  c.init_from = ""  # A workdir checkpoint dir or HF directory: its weights, a fresh optimizer.
  c.data = ml_collections.ConfigDict(dict(
      source="builtin", paths="", jsonl_field="text", builtin_docs=20000, seq_len=128, batch_size=8,
      seed=0, eval_fraction=0.02, add_bos=True, add_eos=True))
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="train_sentencepiece",  # Or "sentencepiece" / "hf_json" with `path`.
      path="", train_docs=4000, bos_token="", eos_token=""))
  c.optimizer = ml_collections.ConfigDict(dict(
      peak_lr=3e-3, end_lr_fraction=0.1, warmup_steps=20, schedule="cosine", decay_fraction=0.2,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  c.step = ml_collections.ConfigDict(dict(
      mtp_weight=0.3, mtp_weight_final=0.1, mtp_switch_step=240,  # V3: 0.3, then 0.1 late on.
      balance_weight=1e-4, bias_gamma=1e-3, bias_gamma_stop_step=0,
      microbatches=1, spike_zscore=6.0, spike_window=32))
  # Device mesh (model/sharding.py): axis sizes within a slice, one of them -1 (the rest of the
  # devices); dcn_* sizes multiply an axis across TPU slices or hosts (hybrid mesh).
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1))
  c.max_bad_steps = 4  # Consecutive skipped steps that restore the last checkpoint; 0: never.
  c.total_steps = 300
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.eval_every = 100
  c.eval_batches = 4
  c.peak_flops = 0.0  # FLOP/s for MFU; 0: the device table, or a matmul measured at start-up.
  if arg == "deepseek_v3":
    c.model.preset = "deepseek_v3_671b"
    c.model_overrides.update(vocab_size=129280, max_seq_len=4096, dtype="bfloat16",
                             remat_policy="full", capacity_factor=1.25)
    c.data.update(source="jsonl", seq_len=4096, batch_size=1024)
    c.tokenizer.kind = "hf_json"
    c.step.microbatches = 8
    c.mesh.update(data=1, fsdp=4, expert=32, tensor=4)
  elif arg:
    raise ValueError(f"configs/pretrain.py: unknown variant {arg!r}; known: deepseek_v3")
  return c
