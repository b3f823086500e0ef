"""Joining a multi-process job: call `initialize()` first thing in every entry point."""

from __future__ import annotations

import os

import jax


def is_multiprocess_job() -> bool:
  """True under an explicit JAX_NUM_PROCESSES > 1, a SLURM job of several tasks, or a TPU pod."""
  env = os.environ
  if int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1


def initialize() -> None:
  """`jax.distributed.initialize()` when the job has several processes; a no-op otherwise.

  Explicit settings come from JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
  and JAX_PROCESS_ID; without them JAX detects SLURM, Open MPI and TPU pods itself. CPU processes
  exchange collectives over gloo.
  """
  if not is_multiprocess_job():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  env = os.environ
  if "JAX_PROCESS_ID" in env:
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
