"""config.init_from: weights from a HF directory or a workdir checkpoint, with a fresh optimizer."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from model.transformer import init_model
from tests.conftest import small_config
from train import optimizer as opt
from train.checkpoint import Checkpointer, check_run_config
from train.loop import _initial_model
from train.step import create_train_state


def _params(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize("kind", ["hf", "workdir"])
def test_init_from_takes_the_weights(kind, tmp_path):
  cfg = small_config(mtp_depth=0)
  source = init_model(cfg, seed=7)
  if kind == "hf":
    pytest.importorskip("safetensors")
    from model import hf
    hf.save_pretrained(source, str(tmp_path))
  else:
    tx = opt.make_optimizer(opt.OptimizerConfig(total_steps=2, warmup_steps=0))
    _, state = create_train_state(source, tx)
    check_run_config(str(tmp_path), dict(model=dataclasses.asdict(cfg)))
    ckpt = Checkpointer(str(tmp_path), every=1, keep=1)
    ckpt.save(5, state, {"unused": 0})
    ckpt.wait()
    ckpt.close()
  c = ml_collections.ConfigDict(dict(init_from=str(tmp_path), seed=0))
  loaded = _initial_model(c, cfg)
  for a, b in zip(_params(source), _params(loaded)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="init_from"):
    _initial_model(c, cfg.replace(d_model=48))
