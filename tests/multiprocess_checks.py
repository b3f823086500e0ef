"""One process of a 2-process job on localhost (run by tests/test_multiprocess.py):

  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I \
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.multiprocess_checks OUT.json

The job joins with `train.distributed.initialize` (gloo collectives), builds a hybrid mesh with the
two processes along dcn `data` and each process's two devices along `expert`, and runs 3 sharded
train steps, each process feeding its half of the batch. Process 0 then runs the same 3 steps on one
local device without a mesh and writes both losses and the largest parameter difference.
"""

import json
import sys

from train import distributed

distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from model import sharding  # noqa: E402
from model.transformer import init_model  # noqa: E402
from tests.conftest import small_config  # noqa: E402
from tests.multidevice_checks import batch  # noqa: E402
from train import optimizer as opt  # noqa: E402
from train.parallel import create_sharded_state, jit_train_step, put_batch  # noqa: E402
from train.step import StepConfig, create_train_state, make_train_step  # noqa: E402

STEPS = 3


def main(path):
  assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
  cfg = small_config(vocab_size=64, num_layers=2, mtp_depth=0)
  tx = opt.make_optimizer(opt.OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10))
  step_cfg = StepConfig(spike_zscore=0.0)
  data = [batch(cfg, seed=s) for s in range(STEPS)]
  half = 8 // jax.process_count()
  rows = slice(jax.process_index() * half, (jax.process_index() + 1) * half)

  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, expert=2, dcn_data=2))
  template, state, shardings = create_sharded_state(cfg, tx, mesh, seed=0)
  step = jit_train_step(make_train_step(template, tx, step_cfg), shardings, mesh, 8)
  losses = []
  for b in data:
    state, metrics = step(state, put_batch({k: v[rows] for k, v in b.items()}, mesh, 8))
    losses.append(float(metrics["loss"]))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() != 0:
    return

  device = jax.local_devices()[0]
  ref_template, ref_state = create_train_state(init_model(cfg, seed=0), tx)
  ref_state = jax.device_put(ref_state, device)
  ref_step = jax.jit(make_train_step(ref_template, tx, step_cfg))
  ref_losses = []
  for b in data:
    ref_state, metrics = ref_step(ref_state, jax.device_put(jax.tree.map(jnp.asarray, b), device))
    ref_losses.append(float(metrics["loss"]))
  diffs = jax.tree.map(lambda a, r: float(np.max(np.abs(np.asarray(a) - np.asarray(r)))),
                       params, jax.device_get(ref_state.params))
  with open(path, "w") as f:
    json.dump(dict(losses=losses, ref_losses=ref_losses, param_diff=max(jax.tree.leaves(diffs)),
                   mesh=dict(mesh.shape), processes=jax.process_count()), f)


if __name__ == "__main__":
  main(sys.argv[1])
