"""Pre-training on the built-in corpus with the tiny model: the no-flag default of train.pretrain.

  python -m train.pretrain --config=configs/pretrain.py --workdir=/tmp/run --config.total_steps=50
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # Model initialisation.
  c.model = ml_collections.ConfigDict(dict(preset="tiny"))
  c.model_overrides = ml_collections.ConfigDict(dict(vocab_size=512, max_seq_len=128))
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
  c.max_bad_steps = 4  # Consecutive skipped steps that restore the last checkpoint; 0: never.
  c.total_steps = 300
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.eval_every = 100
  c.eval_batches = 4
  c.peak_flops = 0.0  # FLOP/s for MFU; 0: the device table, or a matmul measured at start-up.
  return c
