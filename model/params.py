"""Parameter counts from abstract shapes (`nnx.eval_shape`: no memory is allocated): the check
on ModelConfig.param_counts' closed form."""

from __future__ import annotations

import math

from flax import nnx

from model.config import ModelConfig
from model.transformer import abstract_model

_ROUTED = ("w_gate", "w_up", "w_down")


def count_params(cfg: ModelConfig) -> dict:
  """{total, activated, embedding, mtp}: total and activated exclude the MTP modules.

  Activated counts what one token uses: everything but the routed experts it is not sent to
  (a fraction K/E of the routed experts is active). `embedding` is the input table, a lookup that
  costs no matmul FLOPs (counted in total and activated).
  """
  state = nnx.state(abstract_model(cfg), nnx.Param)
  total = activated = embedding = mtp = 0
  active_fraction = cfg.experts_per_token / cfg.num_experts if cfg.num_experts else 1.0
  for path, leaf in nnx.to_flat_state(state):
    n = math.prod(leaf.shape)
    names = [str(p) for p in path]
    if names[0] == "mtp":
      mtp += n
      continue
    total += n
    activated += n * active_fraction if names[-1] in _ROUTED else n
    if names[0] == "embed":
      embedding += n
  return dict(total=total, activated=int(round(activated)), embedding=embedding, mtp=mtp)
