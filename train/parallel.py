"""Training on a device mesh: the train state created already sharded, the step jitted with
in/out shardings and donated state, and process-local batches assembled into global arrays.

Shardings come from `model.sharding` (the one table); nothing here names a parameter.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import sharding
from model.config import ModelConfig
from model.params import abstract_model
from model.transformer import Transformer, init_model
from train.step import ModelTemplate, TrainState, create_train_state


def _dict_paths(tree) -> set:
  """Dict paths of the leaves that are model parameters by the table (LoRA adapters, which are
  not, stay replicated: they are small)."""
  paths = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    try:
      sharding.param_axes(sharding.dict_path(path), len(getattr(leaf, "shape", ())))
    except (KeyError, ValueError):
      continue
    paths.add(sharding.dict_path(path))
  return paths


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """NamedShardings for a (possibly abstract) TrainState: parameters, router biases and the
  optimizer's per-parameter moments by the table; counters replicated."""
  return sharding.tree_shardings(state, mesh, _dict_paths(state.params) | _dict_paths(state.extra))


INITS = ("auto", "flat", "modules")


def param_shardings(tree, mesh: Mesh):
  """NamedShardings for a frozen parameter tree (reference policy, reward model, LoRA base):
  laid out like the policy's parameters."""
  return sharding.tree_shardings(tree, mesh, _dict_paths(tree))


def create_sharded_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         seed: int = 0, spike_window: int = 32, init: str = "auto"):
  """(template, state, shardings): a fresh model and optimizer state, computed by one jitted
  function whose outputs are born sharded (no host holds the whole state).

  `init`: "flat" is `init_model` (one normal draw sliced into place: fast to compile on CPU, but
  XLA materialises the whole draw on every device); "modules" draws each parameter with its
  module's initialiser, directly in its own sharding (for large models); "auto" is "flat" on CPU
  and "modules" on TPU/GPU.
  """
  if init not in INITS:
    raise ValueError(f"create_sharded_state: init must be one of {INITS}, got {init!r}")
  if init == "auto":
    init = "flat" if jax.default_backend() == "cpu" else "modules"
  make_model = ((lambda: init_model(cfg, seed)) if init == "flat" else
                (lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))

  def build():
    return create_train_state(make_model(), tx, spike_window)[1]

  shardings = state_shardings(jax.eval_shape(build), mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(build, out_shardings=shardings)()
  return ModelTemplate(abstract_model(cfg)), state, shardings


def shard_state(state: TrainState, mesh: Mesh):
  """(state, shardings) for a state built on the host (e.g. from a HF checkpoint)."""
  shardings = state_shardings(state, mesh)
  return jax.device_put(state, shardings), shardings


def batch_sharding(mesh: Mesh, global_batch: int) -> NamedSharding:
  """Sharding of [B, ...] batch arrays of any rank (token rows, per-row advantages): B over the
  batch axes (data, fsdp, expert), the rest replicated."""
  return NamedSharding(mesh, sharding.batch_spec(1, mesh, global_batch))


def batch_shards(mesh: Mesh) -> int:
  """How many parts the mesh splits a batch's rows into (the product of the batch axes)."""
  return int(np.prod([mesh.shape[a] for a in sharding.LOGICAL_AXES["batch"]]))


def check_batch_layout(batch_size: int, microbatches: int, mesh: Mesh,
                       source: str = "config.data.batch_size") -> None:
  """ValueError unless `microbatches` divides the global batch and each micro-batch divides over
  the axes that split the batch (data x fsdp x expert); otherwise rows would be replicated.
  `source`: the config fields the batch size comes from, for the message."""
  if microbatches < 1 or batch_size % microbatches:
    raise ValueError(f"config.step.microbatches {microbatches} must be >= 1 and divide the batch "
                     f"of {batch_size} rows ({source})")
  axes = {a: mesh.shape[a] for a in sharding.LOGICAL_AXES["batch"]}
  shards = batch_shards(mesh)
  if (batch_size // microbatches) % shards:
    raise ValueError(f"a micro-batch of {batch_size // microbatches} rows (batch {batch_size} "
                     f"from {source} / {microbatches} micro-batches) does not divide over the "
                     f"mesh's {shards} batch shards "
                     f"({' x '.join(f'{a}={n}' for a, n in axes.items())}): make it a multiple "
                     f"of {shards}, or change config.mesh")


def put_batch(batch: dict, mesh: Mesh, global_batch: int) -> dict:
  """This process's rows of the global batch -> global arrays laid out by `batch_sharding`."""
  target = batch_sharding(mesh, global_batch)
  return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in batch.items()}


def jit_sharded(fn, mesh: Mesh, in_shardings, out_shardings, donate_argnums=()):
  """`jax.jit(fn, ...)` whose calls (and `.lower`) run with `mesh` set, so `sharding.constrain` and
  the expert-parallel MoE see it while tracing."""
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums)

  @functools.wraps(fn)
  def call(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh):
      return jitted.lower(*args)

  call.lower = lower
  return call


def jit_train_step(train_step, shardings: TrainState, mesh: Mesh, global_batch: int,
                   frozen_shardings=None):
  """`train_step(state, batch[, frozen])` jitted with state, batch (and frozen-tree) shardings,
  replicated metrics and the state donated."""
  ins = (shardings, batch_sharding(mesh, global_batch))
  if frozen_shardings is not None:
    ins = ins + (frozen_shardings,)
  return jit_sharded(train_step, mesh, ins, (shardings, NamedSharding(mesh, P())),
                     donate_argnums=0)
