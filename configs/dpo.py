"""The DPO family on preference pairs: the no-flag default of posttrain.dpo.

  python -m posttrain.dpo --config=configs/dpo.py --workdir=workdir/dpo --config.init_from=workdir/sft
  python -m posttrain.dpo --config=configs/dpo.py:ipo ...     # also :simpo, :cdpo, :lora
  ... --config.data.source=jsonl --config.data.paths=prefs.jsonl  # soft "label"s: soft-label DPO

The built-in pairs are the tasks' reference solutions against wrong, malformed or rambling
variants (posttrain/preferences.py); held-out preference accuracy is logged as eval_accuracy.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # Required: an SFT workdir (any chat checkpoint) or a HF directory.
  c.model_overrides = common.model_overrides()
  c.data = common.preference_data()
  c.dpo = ml_collections.ConfigDict(dict(
      loss="sigmoid",  # sigmoid (DPO) | ipo | simpo.
      beta=0.1, label_smoothing=0.0, simpo_gamma=0.5,
      nll_weight=0.0,  # RPO: + this x the chosen side's mean token NLL.
      reference="cached"))  # cached: computed once into DIR; online: a frozen copy in the step.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="q_a,q_b,kv_a,kv_b,o"))
  c.optimizer = common.optimizer(peak_lr=5e-5, warmup_steps=10, end_lr_fraction=0.1,
                                 weight_decay=0.0)
  c.step = common.step(mtp_weight=0.0, mtp_weight_final=0.0, mtp_switch_step=0, bias_gamma=0.0,
                       spike_zscore=0.0)
  c.mesh = common.mesh()
  common.add_loop(c, total_steps=200, log_every=10, checkpoint_every=100, keep_checkpoints=2,
                  eval_every=100, eval_batches=25)
  if arg == "ipo":
    c.dpo.update(loss="ipo", beta=0.5)
  elif arg == "simpo":
    c.dpo.update(loss="simpo", beta=2.0, simpo_gamma=1.0)
    c.optimizer.peak_lr = 1e-5
  elif arg == "cdpo":
    c.dpo.label_smoothing = 0.1
  elif arg == "rpo":
    c.dpo.nll_weight = 1.0
  elif arg == "lora":
    c.lora.rank = 8
    c.optimizer.peak_lr = 5e-4
  elif arg:
    raise ValueError(f"configs/dpo.py: unknown variant {arg!r}; known: cdpo, ipo, lora, rpo, simpo")
  return c
