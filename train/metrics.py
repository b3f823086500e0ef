"""Metrics: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard events in DIR/tb,
a progress line, and MFU."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, by JAX's device_kind (a v5p
# reports "TPU v5", a v5e "TPU v5 lite"; GPUs add their memory, e.g. "NVIDIA H100 80GB HBM3").
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def table_peak(kind: str) -> tuple[str, float] | None:
  """(table name, peak) for a device_kind: the exact name, else the longest name followed by a
  space in `kind` (so "TPU v5 lite" never reads as "TPU v5"); None when the table lacks it."""
  if kind in PEAK_FLOPS:
    return kind, PEAK_FLOPS[kind]
  names = [n for n in PEAK_FLOPS if kind.startswith(n + " ")]
  return (max(names, key=len), PEAK_FLOPS[max(names, key=len)]) if names else None


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted float32 [n, n] matmul on this device (the CPU's practical peak)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops(override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s summed over devices, where it came from): a flag, the table, or a measurement."""
  if override > 0:
    return override, "flag"
  found = table_peak(jax.devices()[0].device_kind)
  if found is not None:
    return found[1] * jax.device_count(), f"table:{found[0]}"
  return measured_matmul_flops() * jax.device_count(), "measured_matmul"


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch (about
  1.5 s at every start-up where it is installed) only to recognise torch tensors, which we never
  log. A torch imported already is used as it is."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # Makes `import torch` raise ImportError, which it handles.
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends JSON lines to DIR/metrics.jsonl and prints a progress line with the ETA."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True, resume_step: int = 0):
    """`resume_step`: the step the run starts from; rows logged after it (by a run that was
    killed before its next checkpoint) are dropped, since this run logs those steps again."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total_steps = total_steps
    self.enabled = enabled
    self.start_time, self.start_step = time.perf_counter(), None
    self.tb = None
    if enabled:
      self._keep_rows_through(resume_step)
      self.tb = _summary_writer()(os.path.join(workdir, "tb"))

  def _keep_rows_through(self, step: int) -> None:
    """Rewrites metrics.jsonl (atomically) with only its rows of steps <= `step`; a last line cut
    short by a kill goes too. Any other line that is not JSON is an error naming it."""
    if not os.path.exists(self.path):
      return
    rows = _parsed_lines(self.path)
    kept = [line for line, row in rows if row["step"] <= step]
    if len(kept) == len(rows) and _ends_whole(self.path):
      return
    from train.checkpoint import write_atomically
    write_atomically(self.path, "".join(line + "\n" for line in kept))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if isinstance(value, float):
        self.tb.add_scalar(key, value, step)
    self.tb.flush()
    if self.start_step is None:
      self.start_step, self.start_time = step, time.perf_counter()
    done = step - self.start_step
    rate = done / max(time.perf_counter() - self.start_time, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    keys = ("loss", "eval_loss", "accuracy", "eval_accuracy", "reward", "lr", "tokens_per_sec", "mfu")
    shown = " ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), float))
    print(f"[{step}/{self.total_steps}] {shown} eta={eta:.0f}s", file=sys.stderr, flush=True)


def _parsed_lines(path: str) -> list[tuple[str, dict]]:
  """(line, row) for every JSON line of a metrics file (none when it is missing). A last line
  cut short by a kill is left out; any other line that is not JSON is an error naming it."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  parsed = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      parsed.append((line, json.loads(line)))
    except json.JSONDecodeError as e:
      if number == len(lines):
        break
      raise ValueError(f"{path}:{number}: not JSON ({e}); repair or remove the line") from e
  return parsed


def _ends_whole(path: str) -> bool:
  """Whether a metrics file is empty or ends with a newline (its last line was not cut)."""
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if not f.tell():
      return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_metrics(workdir: str) -> list[dict]:
  """DIR/metrics.jsonl as rows sorted by step, one per step: the later of two rows of a step wins
  (a run restored after bad steps logs them again). A last line cut short by a kill is ignored;
  any other line that is not JSON is an error naming it. Empty when there is no file."""
  rows = {row["step"]: row for _, row in _parsed_lines(os.path.join(workdir, "metrics.jsonl"))}
  return [rows[s] for s in sorted(rows)]


def quiet_logging() -> None:
  """absl logging at WARNING (orbax logs every save and restore at INFO), unless the command line
  asked for a level (--verbosity=0 shows INFO: checkpoint writes and rollouts as they start)."""
  from absl import flags, logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
