"""Reward model: a scalar head on the SFT model, trained on preference pairs (Bradley-Terry).

  python -m posttrain.reward_model --config=configs/reward_model.py --workdir=workdir/rm \
      --config.init_from=workdir/sft
  ... --config.data.source=jsonl --config.data.paths=prefs.jsonl --config.data.eval_paths=held.jsonl

The built-in pairs are the tasks' reference solutions against wrong, malformed or rambling
variants (posttrain/preferences.py). Held-out pairwise accuracy is logged as eval_accuracy.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # Required: an SFT workdir (any chat checkpoint) or a HF directory.
  c.model_overrides = common.model_overrides()
  c.data = common.preference_data()
  c.reward = ml_collections.ConfigDict(dict(
      center=0.0))  # Coefficient of mean((r_chosen + r_rejected)^2) (TRL's center_rewards).
  c.optimizer = common.optimizer(peak_lr=3e-4, warmup_steps=10, weight_decay=0.0)
  c.step = common.step(mtp_weight=0.0, mtp_weight_final=0.0, mtp_switch_step=0, bias_gamma=0.0,
                       spike_zscore=0.0)
  c.mesh = common.mesh()
  common.add_loop(c, total_steps=200, log_every=10, checkpoint_every=100, keep_checkpoints=2,
                  eval_every=100, eval_batches=25)
  if arg:
    raise ValueError(f"configs/reward_model.py: unknown variant {arg!r}")
  return c
