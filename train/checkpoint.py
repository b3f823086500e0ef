"""Orbax checkpoints of the train state and the data iterator: async saves, retention, resume."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from model import hf
from model.config import ModelConfig
from model.transformer import Transformer, init_model
from train.step import TrainState


class Checkpointer:
  """Saves {state, data iterator state} every `every` steps into DIR/checkpoints, keeping `keep`."""

  def __init__(self, workdir: str, every: int, keep: int):
    self.every = every
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.first_process = jax.process_index() == 0
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict, force: bool = False) -> bool:
    """Starts an asynchronous save when `step` is due (or `force`); returns whether it did."""
    if not force and step % self.every:
      return False
    started = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
    if started:
      logging.info("step %d: writing checkpoint (asynchronously)", step)
    return started

  def restore(self, step: int, abstract_state: TrainState):
    """(state, data iterator state) saved at `step`, laid out like `abstract_state`."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state: TrainState):
    """(step, state, data iterator state) of the newest checkpoint that restores, or None when
    there is none. A newer one that fails twice (a truncated or missing file, another model's) on
    any process is moved aside to DIR/checkpoints/STEP.unreadable-NS with a warning, so that the
    run can write that step again. When none restores, a ValueError names each step and its
    error, and nothing is moved: the run never starts over silently."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      for _ in range(2):  # Once more: a passing read error must not cost a good checkpoint.
        try:
          state, data = self.restore(step, abstract_state)
          error = None
          break
        except Exception as e:  # pylint: disable=broad-except  # Any failure to read the files.
          error = f"{type(e).__name__}: {str(e)[:300]}"
      if _failed_anywhere(error is not None):
        failures.append((step, error or "it failed on another process"))
        print(f"WARNING: {self.directory}/{step} cannot be restored ({failures[-1][1]})",
              file=sys.stderr, flush=True)
        continue
      if failures:
        if self.first_process:
          for bad, _ in failures:
            self._move_aside(bad)
        _sync("checkpoints_moved_aside")  # Every process lists the steps after the renames.
        self.manager.reload()
      return step, state, data
    if failures:
      raise ValueError(f"{self.directory}: no checkpoint could be restored: " + "; ".join(
          f"step {s}: {why}" for s, why in failures) + ". A checkpoint of another model config "
          "does not fit this run: restore good checkpoints, or start over in a new --workdir")
    return None

  def _move_aside(self, step: int) -> None:
    """Renames an unreadable step directory so that the run can write that step again."""
    source = os.path.join(self.directory, str(step))
    target = f"{source}.unreadable-{time.time_ns()}"
    os.rename(source, target)
    print(f"WARNING: moved it to {target} (kept for inspection; delete it when done); resuming "
          "from an earlier checkpoint", file=sys.stderr, flush=True)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _failed_anywhere(failed: bool) -> bool:
  """Whether `failed` holds on any process (each reads its own shards of a checkpoint)."""
  if jax.process_count() == 1:
    return failed
  from jax.experimental import multihost_utils
  return bool(multihost_utils.process_allgather(np.int32(failed)).max())


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def write_atomically(path: str, data) -> None:
  """Writes `data` (str or bytes) to `path` through a temporary file and a rename, so that a
  kill leaves either the old file or the whole new one, never a cut one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb" if isinstance(data, bytes) else "w", **(
      {} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
    f.write(data)
  os.replace(tmp, path)


def check_run_config(workdir: str, run_config: dict) -> None:
  """Writes DIR/run_config.json on the first run; later runs must match it field by field. Until
  the workdir holds any trained work (a checkpoint or a metrics row), a run with another config
  replaces the file: a run refused for a bad input leaves nothing that locks its fix out."""
  path = os.path.join(workdir, "run_config.json")
  if not os.path.exists(path) or not _holds_work(workdir):
    os.makedirs(workdir, exist_ok=True)
    write_atomically(path, json.dumps(run_config, indent=2, sort_keys=True))
    return
  with open(path) as f:
    saved = json.load(f)
  for key in sorted(set(saved) | set(run_config)):
    if saved.get(key) != run_config.get(key):
      raise ValueError(f"{path}: the checkpoint was trained with {key}={saved.get(key)!r}, this run "
                       f"asks for {key}={run_config.get(key)!r}; use a new --workdir or the same "
                       "config")


def _holds_work(workdir: str) -> bool:
  """Whether DIR has a checkpoint step (complete or not) or a non-empty metrics.jsonl."""
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and any(name[:1].isdigit() for name in os.listdir(checkpoints)):
    return True
  metrics = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(metrics) and os.path.getsize(metrics) > 0


def workdir_model_config(workdir: str) -> ModelConfig:
  """The model config a workdir was trained with (DIR/run_config.json)."""
  path = os.path.join(workdir, "run_config.json")
  with open(path) as f:
    fields = dict(json.load(f)["model"])
  try:
    return ModelConfig.from_dict(fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: field 'model' is not a valid ModelConfig: {e}") from e


def load_model(path: str, dtype: str | None = None) -> Transformer:
  """A model with the weights of a HF directory (config.json) or of a workdir's latest checkpoint.

  From a workdir only the parameters and router biases are read (not the optimizer state).
  """
  if os.path.exists(os.path.join(path, "config.json")):
    return hf.load_pretrained(path) if dtype is None else hf.load_pretrained(path, dtype=dtype)
  if not os.path.exists(os.path.join(path, "run_config.json")):
    raise FileNotFoundError(f"{path!r} has neither config.json (HF) nor run_config.json (workdir)")
  with open(os.path.join(path, "run_config.json")) as f:
    run_config = json.load(f)
  if (run_config.get("lora") or {}).get("rank"):
    raise ValueError(f"{path!r} holds LoRA adapters, not a whole model: load it with "
                     "posttrain.lora.load_policy or export it with `python -m posttrain.lora merge`")
  if run_config.get("scored_head"):
    raise ValueError(f"{path!r} holds a {run_config['scored_head']} model (a trunk with a scalar "
                     "head), not a language model: load it with posttrain.heads.load_scored_model")
  cfg = workdir_model_config(path)
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  graphdef, params, extra = nnx.split(nnx.eval_shape(lambda: init_model(cfg)), nnx.Param, ...)
  restored = restore_weights(path, dict(params=nnx.to_pure_dict(params),
                                        extra=nnx.to_pure_dict(extra)))
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(extra, restored["extra"])
  return nnx.merge(graphdef, params, extra)


def restore_weights(path: str, target: dict) -> dict:
  """The {"params", "extra"} trees of workdir `path`'s latest checkpoint, shaped like `target`
  (abstract or concrete arrays), on this process's first device; not the optimizer state."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(path, "checkpoints")))
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise FileNotFoundError(f"{path!r}: no checkpoints under {path}/checkpoints")
  try:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, partial_restore=True)))["state"]
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{path!r}: its step-{step} checkpoint does not fit its run_config.json model "
                     f"({type(e).__name__}: {str(e)[:300]})") from e
  finally:
    manager.close()


def save_weights(workdir: str, model: Transformer, run_config: dict) -> None:
  """Writes a weights-only workdir (an export): DIR/run_config.json and one checkpoint holding
  the parameters and router biases, which load_model and `init_from` read like any workdir."""
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    raise FileExistsError(f"{workdir!r} already has checkpoints; choose a new directory")
  os.makedirs(workdir, exist_ok=True)
  write_atomically(os.path.join(workdir, "run_config.json"),
                   json.dumps(run_config, indent=2, sort_keys=True))
  weights = dict(params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                 extra=nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(weights)))
  manager.wait_until_finished()
  manager.close()
