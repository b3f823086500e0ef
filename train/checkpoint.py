"""Orbax checkpoints of the train state and the data iterator: async saves, retention, resume."""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from train.step import TrainState


class Checkpointer:
  """Saves {state, data iterator state} every `every` steps into DIR/checkpoints, keeping `keep`."""

  def __init__(self, workdir: str, every: int, keep: int):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict, force: bool = False) -> bool:
    """Starts an asynchronous save when `step` is due (or `force`); returns whether it did."""
    if not force and step % self.every:
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state: TrainState):
    """(state, data iterator state) saved at `step`, laid out like `abstract_state`."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def check_run_config(workdir: str, run_config: dict) -> None:
  """Writes DIR/run_config.json on the first run; later runs must match it field by field."""
  path = os.path.join(workdir, "run_config.json")
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(run_config, f, indent=2, sort_keys=True)
    return
  with open(path) as f:
    saved = json.load(f)
  for key in sorted(set(saved) | set(run_config)):
    if saved.get(key) != run_config.get(key):
      raise ValueError(f"{path}: the checkpoint was trained with {key}={saved.get(key)!r}, this run "
                       f"asks for {key}={run_config.get(key)!r}; use a new --workdir or the same "
                       "config")
