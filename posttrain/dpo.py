"""The DPO family on preference pairs, through the one loop: DPO (sigmoid), conservative DPO (label
smoothing), soft-label DPO, IPO and SimPO, full or LoRA.

  python -m posttrain.dpo --config=configs/dpo.py --workdir=workdir/dpo --config.init_from=workdir/sft
  python -m posttrain.dpo --config=configs/dpo.py:simpo ...   # also :ipo, :lora

With s = log pi(y|x) summed over response tokens, h = (s_c - ref_c) - (s_r - ref_r), and p the
pair's preference probability (label 1 for hard pairs), smoothed p' = p (1 - eps) + (1 - p) eps:
  sigmoid  -(p' log sigmoid(beta h) + (1 - p') log sigmoid(-beta h))   (DPO; cDPO with eps > 0)
  ipo      (h - (p - 1/2) / beta)^2                                    (IPO; at p = 1: 1 / (2 beta))
  simpo    as sigmoid with beta h replaced by beta (s_c / |y_c| - s_r / |y_r|) - gamma
           (SimPO: reference-free, length-normalised, with a target margin gamma)
With nll_weight > 0 (RPO) each pair adds nll_weight x the chosen response's mean token NLL, which
keeps the chosen likelihood from falling with the rejected one. Implicit rewards are beta (s - ref) (SimPO: beta s / |y|). Reference log-probabilities are the
starting model's: computed once before training and cached in DIR/reference_logprobs.npz
(reference="cached"), or by a frozen copy inside every step (reference="online").
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from posttrain import lora
from posttrain.preferences import EncodedPairs, pair_batch, pair_data
from posttrain.start import frozen_copy, load_chat_model, tokenizer_record
from train.checkpoint import check_run_config
from train.loop import Stage, loop_fields, run, run_model_fields
from train.loss import jitted_logprobs, sequence_logprobs
from train.step import router_totals

LOSSES = ("sigmoid", "ipo", "simpo")
REFERENCES = ("cached", "online")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """The preference objective, by name."""

  loss: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0  # eps of conservative DPO (sigmoid and simpo).
  simpo_gamma: float = 0.5  # SimPO's target reward margin.
  nll_weight: float = 0.0  # RPO (TRL's rpo_alpha): + weight x the chosen side's mean token NLL.
  reference: str = "cached"  # Or "online"; SimPO reads no reference.

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"config.dpo.loss must be one of {LOSSES}, got {self.loss!r}")
    if self.reference not in REFERENCES:
      raise ValueError(f"config.dpo.reference must be one of {REFERENCES}, got {self.reference!r}")
    if self.beta <= 0 or not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"config.dpo: need beta > 0 and 0 <= label_smoothing < 0.5, got "
                       f"{self.beta}, {self.label_smoothing}")

  @property
  def uses_reference(self) -> bool:
    return self.loss != "simpo"


def preference_losses(cfg: DpoConfig, chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, label_B,
                      chosen_len_B, rejected_len_B):
  """(per-pair loss, implicit chosen reward, implicit rejected reward), each [B], from summed
  response log-probs of the policy and the reference (see the module doc)."""
  if cfg.loss == "simpo":
    r_c = cfg.beta * chosen_B / jnp.maximum(chosen_len_B, 1.0)
    r_r = cfg.beta * rejected_B / jnp.maximum(rejected_len_B, 1.0)
    logits = r_c - r_r - cfg.simpo_gamma
  else:
    r_c, r_r = cfg.beta * (chosen_B - ref_chosen_B), cfg.beta * (rejected_B - ref_rejected_B)
    logits = r_c - r_r
  if cfg.loss == "ipo":
    loss = (logits / cfg.beta - (label_B - 0.5) / cfg.beta) ** 2
  else:
    p = label_B * (1.0 - cfg.label_smoothing) + (1.0 - label_B) * cfg.label_smoothing
    loss = -(p * jax.nn.log_sigmoid(logits) + (1.0 - p) * jax.nn.log_sigmoid(-logits))
  if cfg.nll_weight:  # RPO.
    loss = loss - cfg.nll_weight * chosen_B / jnp.maximum(chosen_len_B, 1.0)
  return loss, r_c, r_r


def _both_sides(batch):
  tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
  return tokens, jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])


def dpo_loss(cfg: DpoConfig, reference=None):
  """The stage loss_fn over a batch of pairs (one forward over both sides); `reference(frozen)`
  is the online reference model, else the batch carries ref_chosen / ref_rejected."""
  def loss_fn(policy, batch, frozen, step):
    del step
    tokens, mask = _both_sides(batch)
    _, logp, out = sequence_logprobs(policy, tokens, mask, with_output=True)
    b = batch["chosen"].shape[0]
    if cfg.uses_reference and reference is not None:
      ref = jax.lax.stop_gradient(sequence_logprobs(reference(frozen), tokens, mask)[1])
      ref_c, ref_r = ref[:b], ref[b:]
    elif cfg.uses_reference:
      ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
    else:
      ref_c = ref_r = jnp.zeros((b,), jnp.float32)
    lengths = mask.astype(jnp.float32).sum(-1)
    loss, r_c, r_r = preference_losses(cfg, logp[:b], logp[b:], ref_c, ref_r, batch["label"],
                                       lengths[:b], lengths[b:])
    nll = -logp[:b] / jnp.maximum(lengths[:b], 1.0)
    sums = dict(loss=loss.sum(), accuracy=(r_c > r_r).astype(jnp.float32).sum(),
                margin=(r_c - r_r).sum(), reward_chosen=r_c.sum(), reward_rejected=r_r.sum(),
                logp_chosen=logp[:b].sum(), logp_rejected=logp[b:].sum(), nll_chosen=nll.sum())
    return loss.sum(), jnp.asarray(b, jnp.float32), dict(sums=sums, totals=router_totals(out))
  return loss_fn


def reference_logprobs(model, pairs: EncodedPairs, width: int, batch_size: int) -> dict:
  """Summed response log-probs of every pair's two sides under `model`: {"ref_chosen",
  "ref_rejected"} [N] float32 (the last batch padded with copies of the first pair)."""
  n = len(pairs.chosen)
  chosen, rejected = [], []
  for start in range(0, n, batch_size):
    rows = list(range(start, min(n, start + batch_size)))
    real = len(rows)
    batch = pair_batch(pairs, rows + [0] * (batch_size - real), width)
    tokens, mask = _both_sides(batch)
    logp = np.asarray(jax.device_get(jitted_logprobs(model, tokens, mask)[1]))
    chosen.append(logp[:real])
    rejected.append(logp[batch_size:batch_size + real])
  return dict(ref_chosen=np.concatenate(chosen).astype(np.float32),
              ref_rejected=np.concatenate(rejected).astype(np.float32))


def _fingerprint(pairs: EncodedPairs, init_from: str) -> str:
  h = hashlib.sha256(os.path.abspath(init_from).encode())
  for side in (pairs.chosen, pairs.rejected):
    for tokens, mask in side:
      h.update(tokens.tobytes())
      h.update(mask.tobytes())
  return h.hexdigest()


def cached_reference(path: str, model, pairs: EncodedPairs, init_from: str, width: int,
                     batch_size: int) -> dict:
  """The reference log-probs of `pairs`, read from `path` (an .npz, no pickle) when it was made
  from the same pairs and starting checkpoint, else computed once and written there."""
  fingerprint = _fingerprint(pairs, init_from)
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      if str(f["fingerprint"]) == fingerprint:
        return dict(ref_chosen=f["ref_chosen"], ref_rejected=f["ref_rejected"])
  print(f"reference log-probs: {len(pairs.chosen)} pairs -> {path}", flush=True)
  ref = reference_logprobs(model, pairs, width, batch_size)
  tmp = path + ".tmp.npz"
  np.savez(tmp, fingerprint=np.asarray(fingerprint), **ref)
  os.replace(tmp, path)
  return ref


def dpo_stage(c: ml_collections.ConfigDict, workdir: str) -> Stage:
  """The DPO stage: preference pairs, the configured objective, full fine-tuning or LoRA."""
  if not c.init_from:
    raise ValueError("config.init_from is required: an SFT workdir (any chat checkpoint) or a HF "
                     "directory")
  os.makedirs(workdir, exist_ok=True)
  d, dcfg = c.data, DpoConfig(**dict(c.dpo))
  policy, tokenizer = load_chat_model(c.init_from, workdir, dict(c.model_overrides))
  cfg = policy.cfg
  lora_cfg = lora.LoraConfig(**dict(c.lora))
  run_config = dict(model=run_model_fields(cfg), data=d.to_dict(), init_from=c.init_from,
                    tokenizer=tokenizer_record(tokenizer), lora=dataclasses.asdict(lora_cfg),
                    dpo=dataclasses.asdict(dcfg))
  check_run_config(workdir, dict(run_config, **loop_fields(c)))
  if d.seq_len > cfg.max_seq_len:
    raise ValueError(f"config.data.seq_len {d.seq_len} exceeds the model's max_seq_len "
                     f"{cfg.max_seq_len}")
  shard = (jax.process_index(), jax.process_count())
  batches, held_out = pair_data(d, tokenizer, "train", shard), pair_data(d, tokenizer, "eval", shard)
  frozen, reference = None, None
  if dcfg.uses_reference and dcfg.reference == "online":
    tree, rebuild = frozen_copy(policy)
    frozen, reference = {"reference": tree}, lambda f: rebuild(f["reference"])
  elif dcfg.uses_reference:
    for name, source in (("train", batches), ("eval", held_out)):
      if source is not None:
        source.extra = cached_reference(
            os.path.join(workdir, f"reference_logprobs_{name}.npz"), policy, source.pairs,
            c.init_from, d.seq_len, d.batch_size)
  stage = Stage(
      name="dpo", cfg=cfg, run_config=run_config, batches=batches, batch_size=d.batch_size,
      tokens_per_batch=2 * d.batch_size * d.seq_len, loss_fn=dpo_loss(dcfg, reference),
      initial_model=lambda: policy, frozen=frozen,
      eval_batches=held_out.fixed if held_out is not None else None,
      flops_per_token=cfg.flops_per_token(d.seq_len), perplexity=False)
  return lora.apply(stage, lora_cfg) if lora_cfg.rank else stage


def dpo(c: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) DPO; returns this invocation's logged metrics rows."""
  return run(dpo_stage(c, workdir), c, workdir)


if __name__ == "__main__":
  from posttrain.cli import run_stage_cli
  run_stage_cli("dpo", dpo, lambda row: f"loss {row['loss']:.4f} accuracy "
                                        f"{row.get('accuracy', float('nan')):.3f}")
