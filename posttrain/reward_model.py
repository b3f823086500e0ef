"""Reward model: the chat model with a scalar head (posttrain/heads.py) read at the last real token
of a conversation, trained on preference pairs with the Bradley-Terry loss, through the one loop.

  python -m posttrain.reward_model --config=configs/reward_model.py --workdir=workdir/rm \
      --config.init_from=workdir/sft

Loss per pair, with z = r_chosen - r_rejected - margin and p the label (probability that chosen
is preferred, 1 for hard labels):  -(p log sigmoid(z) + (1 - p) log sigmoid(-z))
                                   + center * (r_chosen + r_rejected)^2.
A trained workdir loads as a batched, jitted reward callable (`reward_function`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from posttrain.chat import encode_chat, turn_content
from posttrain.data import bucket_width
from posttrain.heads import ScoredModel, last_token_scores, load_scored_model
from posttrain.preferences import pair_data
from posttrain.start import load_chat_model, tokenizer_record
from train.checkpoint import check_run_config
from train.loop import Stage, loop_fields, run, run_model_fields
from train.step import router_totals
from train.tokenizer import load_tokenizer


def bradley_terry_loss(chosen_B, rejected_B, label_B=None, margin_B=None):
  """Per-pair Bradley-Terry loss -(p log s(z) + (1 - p) log s(-z)), z = chosen - rejected - margin."""
  z = chosen_B - rejected_B - (0.0 if margin_B is None else margin_B)
  p = 1.0 if label_B is None else label_B
  return -(p * jax.nn.log_sigmoid(z) + (1.0 - p) * jax.nn.log_sigmoid(-z))


def pair_scores(model: ScoredModel, batch: dict):
  """(chosen rewards [B], rejected rewards [B], trunk output): both sides in one forward."""
  tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
  last = jnp.concatenate([batch["chosen_last"], batch["rejected_last"]])
  scores, out = model(tokens)
  rewards = last_token_scores(scores, last)
  b = batch["chosen"].shape[0]
  return rewards[:b], rewards[b:], out


def reward_model_loss(center: float = 0.0):
  """The stage loss_fn: summed Bradley-Terry loss (+ centring) over the pairs of a batch."""
  def loss_fn(model, batch, frozen, step):
    del frozen, step
    r_c, r_r, out = pair_scores(model, batch)
    per_pair = bradley_terry_loss(r_c, r_r, batch["label"], batch["margin"])
    if center:
      per_pair = per_pair + center * (r_c + r_r) ** 2
    n = jnp.asarray(r_c.shape[0], jnp.float32)
    sums = dict(loss=per_pair.sum(), accuracy=(r_c > r_r).astype(jnp.float32).sum(),
                margin=(r_c - r_r).sum(), reward_chosen=r_c.sum(), reward_rejected=r_r.sum())
    return per_pair.sum(), n, dict(sums=sums, totals=router_totals(out))
  return loss_fn


def reward_model_stage(c: ml_collections.ConfigDict, workdir: str) -> Stage:
  """The reward-model stage: a scalar head on the `init_from` chat model, Bradley-Terry loss."""
  if not c.init_from:
    raise ValueError("config.init_from is required: an SFT workdir (any chat checkpoint) or a HF "
                     "directory")
  os.makedirs(workdir, exist_ok=True)
  d = c.data
  trunk, tokenizer = load_chat_model(c.init_from, workdir, dict(c.model_overrides))
  cfg = trunk.cfg
  run_config = dict(model=run_model_fields(cfg), data=d.to_dict(), init_from=c.init_from,
                    tokenizer=tokenizer_record(tokenizer), reward=c.reward.to_dict(),
                    scored_head="reward")
  check_run_config(workdir, dict(run_config, **loop_fields(c)))
  if d.seq_len > cfg.max_seq_len:
    raise ValueError(f"config.data.seq_len {d.seq_len} exceeds the model's max_seq_len "
                     f"{cfg.max_seq_len}")
  shard = (jax.process_index(), jax.process_count())
  batches = pair_data(d, tokenizer, "train", shard)
  held_out = pair_data(d, tokenizer, "eval", shard)
  model = ScoredModel(trunk, seed=c.seed)
  return Stage(
      name="reward_model", cfg=cfg, run_config=run_config, batches=batches,
      batch_size=d.batch_size, tokens_per_batch=2 * d.batch_size * d.seq_len,
      loss_fn=reward_model_loss(c.reward.center), initial_model=lambda: model,
      eval_batches=held_out.fixed if held_out is not None else None,
      flops_per_token=cfg.flops_per_token(d.seq_len), perplexity=False)


def reward_model(c: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains (or resumes) a reward model; returns this invocation's logged metrics rows."""
  return run(reward_model_stage(c, workdir), c, workdir)


@nnx.jit
def _scores(model: ScoredModel, tokens_BT, last_B):
  return last_token_scores(model(tokens_BT)[0], last_B)


def score_chats(model: ScoredModel, tokenizer, chats, batch_size: int = 32) -> np.ndarray:
  """The reward of each conversation (its score at the last real token), in float32. Rows are
  right-padded to a multiple of 32 tokens (up to max_seq_len) and run in fixed-size batches,
  so calls of similar lengths share one compiled shape; longer chats keep their first tokens."""
  limit = model.cfg.max_seq_len
  encoded = [encode_chat(tokenizer, m)[0][:limit] for m in chats]
  width = bucket_width([len(t) for t in encoded], limit)
  out = []
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    last = np.zeros((batch_size,), np.int32)
    for i, t in enumerate(chunk):
      tokens[i, :len(t)], last[i] = t, len(t) - 1
    out.append(np.asarray(jax.device_get(_scores(model, tokens, last)))[:len(chunk)])
  return np.concatenate(out)


def reward_function(path: str, batch_size: int = 32):
  """The reward model of workdir `path` as a reward callable
  `(prompts, completions, **fields) -> list[float]` (posttrain/rewards.py): each prompt a user
  turn, its completion the assistant's reply (up to any structural token it runs on into)."""
  model, tokenizer = load_scored_model(path, "reward"), load_tokenizer(path)

  def reward_model(prompts, completions, **fields):
    del fields
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": turn_content(c)}]
             for p, c in zip(prompts, completions)]
    return [float(x) for x in score_chats(model, tokenizer, chats, batch_size)]
  return reward_model


if __name__ == "__main__":
  from posttrain.cli import run_stage_cli
  run_stage_cli("reward_model", reward_model,
                lambda row: f"loss {row['loss']:.4f} accuracy {row.get('accuracy', float('nan')):.3f}")
