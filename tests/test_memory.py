"""The memory planner against XLA's compiled memory analysis of the train step (small configs)."""

import jax
import jax.numpy as jnp
import pytest

from model.config import get_preset
from model.transformer import init_model
from tests.conftest import small_config
from tests.multidevice_checks import batch
from train import memory, optimizer as opt
from train.step import StepConfig, create_train_state, make_train_step

ONE_DEVICE = dict(data=1, fsdp=1, expert=1, tensor=1)
TEMP_TOLERANCE = (0.75, 1.33)  # XLA:CPU temp / planned gradients + activations.


@pytest.mark.parametrize("remat", ["full"])  # Remat "none": test_sharding.py's 8-device meshes.
@pytest.mark.parametrize("moe_impl", ["blocked", "auto"])  # auto: the native kernel on CPU.
def test_plan_matches_compiled_memory_analysis(remat, moe_impl):
  cfg = small_config(num_layers=4, mtp_depth=0, vocab_size=64, remat_policy=remat,
                     moe_impl=moe_impl)
  tx = opt.make_optimizer(opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10))
  template, state = create_train_state(init_model(cfg), tx)
  data = jax.tree.map(jnp.asarray, batch(cfg, b=8, t=64))
  analysis = jax.jit(make_train_step(template, tx, StepConfig()), donate_argnums=0).lower(
      state, data).compile().memory_analysis()
  plan = memory.plan(cfg, ONE_DEVICE, 8, 64)
  arguments = plan["params"] + plan["extra"] + plan["optimizer"] + plan["batch"]
  assert abs(analysis.argument_size_in_bytes - arguments) <= 1e-3 * arguments, (analysis, plan)
  ratio = analysis.temp_size_in_bytes / (plan["gradients"] + plan["activations"])
  assert TEMP_TOLERANCE[0] < ratio < TEMP_TOLERANCE[1], (ratio, analysis, plan)


def test_remat_and_sharding_shrink_the_v3_plan():
  cfg = get_preset("deepseek_v3_671b").replace(dtype="bfloat16", capacity_factor=1.25)
  mesh = memory.parse_mesh("fsdp=32,expert=32,tensor=8,dcn_data=2")
  assert mesh == dict(data=2, fsdp=32, expert=32, tensor=8)
  full = memory.plan(cfg.replace(remat_policy="full"), mesh, 2048, 4096, microbatches=4)
  none = memory.plan(cfg, mesh, 2048, 4096, microbatches=4)
  assert full["activations"] < none["activations"] / 5
  # 671B float32 parameters over the 32 x 32 x 8 model-parallel devices (the router and norms
  # are only FSDP-sharded): about 2.7 TB / 8192 each.
  assert 0.3e9 < full["params"] < 0.5e9 and full["optimizer"] == 2 * full["params"]
