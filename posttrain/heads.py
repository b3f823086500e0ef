"""A transformer trunk with a scalar head on its final hidden states: the reward model (a score at
the last real token) and PPO's value model (a value per token) are both this.

The head is `score [D]` and `score_bias []` in float32, read from the final-normed hidden states
(ModelOutput.hidden). In checkpoints the trunk's variables sit under "trunk", so a trunk started
from a language model keeps its parameter paths below that prefix (the sharding table matches
suffixes; the head is replicated).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import Transformer, init_model
from train.checkpoint import restore_weights, workdir_model_config

class ScoredModel(nnx.Module):
  """`trunk` (a Transformer) and a scalar head: a score per token."""

  def __init__(self, trunk: Transformer, seed: int = 0, init_scale: float | None = None):
    self.trunk = trunk
    d = trunk.cfg.d_model
    scale = (1.0 / np.sqrt(d)) if init_scale is None else init_scale
    self.score = nnx.Param(scale * jax.random.normal(jax.random.key(seed), (d,), jnp.float32))
    self.score_bias = nnx.Param(jnp.zeros((), jnp.float32))

  @property
  def cfg(self):
    return self.trunk.cfg

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, replay_LBTK=None):
    """(scores [B, T] float32, the trunk's ModelOutput). `replay_LBTK`: recorded experts per MoE
    layer (routing replay, as for the Transformer). The trunk's MTP modules are not run: a head
    reads the final hidden states only."""
    out = self.trunk(tokens_BT, positions_BT, segment_ids_BT, replay_LBTK, mtp=False)
    scores_BT = out.hidden.astype(jnp.float32) @ self.score[...] + self.score_bias[...]
    return scores_BT, out


def last_token_scores(scores_BT, last_B):
  """scores[b, last[b]]: the score at each row's last real token [B]."""
  return jnp.take_along_axis(scores_BT, last_B[:, None].astype(jnp.int32), axis=1)[:, 0]


def head_kind(path: str) -> str | None:
  """The `scored_head` a workdir's run_config.json records ("reward", "value"), or None."""
  config = os.path.join(path, "run_config.json")
  if not os.path.exists(config):
    return None
  with open(config) as f:
    return json.load(f).get("scored_head")


def load_scored_model(path: str, kind: str = "reward") -> ScoredModel:
  """The ScoredModel of a workdir trained with `scored_head=kind` (its latest checkpoint's
  parameters and router biases); ValueError naming the path when it holds something else."""
  found = head_kind(path)
  if found != kind:
    raise ValueError(f"{path!r} holds {'a ' + found + ' model' if found else 'no scored model'}"
                     f", not a {kind} model (run_config.json field 'scored_head')")
  cfg = workdir_model_config(path)
  abstract = nnx.eval_shape(lambda: ScoredModel(init_model(cfg)))
  graphdef, params, extra = nnx.split(abstract, nnx.Param, ...)
  restored = restore_weights(path, dict(params=nnx.to_pure_dict(params),
                                        extra=nnx.to_pure_dict(extra)))
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(extra, restored["extra"])
  return nnx.merge(graphdef, params, extra)
