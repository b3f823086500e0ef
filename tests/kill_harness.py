"""Kill anywhere: SIGKILL a training stage at random moments, re-run the same command, and check
that every re-run resumed from the last complete checkpoint and that the run ends exactly where an
uninterrupted one does.

  python -m tests.kill_harness --stage=grpo --kills=20 --seed=0 --root=/tmp/kills
  python -m tests.kill_harness --stage=all --kills=12     # every stage in turn

Each stage runs a tiny config through its real command line (`python -m train.pretrain`,
`posttrain.sft`, `posttrain.reward_model`, `posttrain.dpo`, and `posttrain.rlhf` with GRPO or
PPO against the reward model); the post-training stages start from the pre-training reference
run. A kill picks, at random, one of the stage's kill points and a moment
there, and SIGKILLs the whole process group:

  step        a random delay (up to one step's time) after the progress line of a random step,
              so inside a step, its metrics or its checkpoint;
  checkpoint  as an asynchronous checkpoint write begins (the "writing checkpoint" log line);
  rollout     as an RL stage begins sampling a rollout (the "sampling rollout" log line).

Kills come in rounds of up to `--kills_per_run` on one work directory; after a round's last kill
the command runs to the end, and the harness checks three things against an uninterrupted run of
the same command:
  1. every re-run resumed from the newest checkpoint that was complete when it was killed (its
     "resumed from ... step S" line; a fresh start only when there was none);
  2. the final train state (parameters, router biases, optimizer state, guard counters) and the
     data iterator's state are equal, bitwise;
  3. every logged metric but the timings (metrics.jsonl) is equal.
For GRPO the rollout RNG, the prompt cursor and the rollouts served are the batch source's state,
so a resumed run samples the same rollouts (dynamic sampling draws its refills from the same
cursor). Every program is compiled once: the runs share a persistent compilation cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = re.compile(r"seconds|per_sec|mfu|peak_flops_source")
RESUMED = re.compile(r"resumed from .* step (\d+)")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """A stage's command line (tiny config), the kill points it offers, and the stages whose
  uninterrupted runs it starts from ((flag, stage) pairs)."""

  module: str
  flags: tuple
  kill_points: tuple
  needs: tuple = (("init_from", "pretrain"),)


LOOP = ("--config.log_every=1", "--config.eval_every=0", "--config.peak_flops=1e11",
        "--config.keep_checkpoints=10", "--config.model_overrides.dtype=float32")
SHORT = ("--config.total_steps=10", "--config.checkpoint_every=3",
         "--config.optimizer.warmup_steps=2")
PAIRS = ("--config.data.builtin_pairs=60", "--config.data.eval_pairs=8",
         "--config.data.batch_size=4", "--config.data.seq_len=96")
RL = ("--config.total_steps=6", "--config.checkpoint_every=2", "--config.data.problems=50",
      "--config.rollout.prompts=2", "--config.rollout.samples=4",
      "--config.rollout.max_new_tokens=12", "--config.rollout.batch_size=8",
      "--config.rollout.epochs=1", "--config.rollout.minibatches=2",
      "--config.rollout.dynamic_sampling=True", "--config.rollout.max_refills=1")
RLHF = (("init_from", "pretrain"), ("reward_model", "reward_model"))
STAGES = {
    "pretrain": StageSpec("train.pretrain", (LOOP[0],) + LOOP[2:4] + SHORT + (
        "--config.eval_every=5", "--config.eval_batches=1", "--config.data.builtin_docs=600",
        "--config.data.batch_size=4", "--config.data.seq_len=64",
        "--config.tokenizer.train_docs=400", "--config.model_overrides.vocab_size=320"),
        ("step", "checkpoint"), needs=()),
    "sft": StageSpec("posttrain.sft", LOOP + SHORT + (
        "--config.data.builtin_examples=200", "--config.data.eval_examples=8",
        "--config.data.batch_size=4", "--config.data.seq_len=96"),
        ("step", "checkpoint")),
    "reward_model": StageSpec("posttrain.reward_model", LOOP + SHORT + PAIRS,
                              ("step", "checkpoint")),
    "dpo": StageSpec("posttrain.dpo", LOOP + SHORT + PAIRS, ("step", "checkpoint")),
    # RLHF against the reward model (its scores differ within every group, so every update moves
    # the parameters; the tiny model's verifier accuracy is 0 throughout).
    "grpo": StageSpec("posttrain.rlhf", LOOP + RL + ("--config.algorithm=grpo",),
                      ("rollout", "step", "checkpoint"), needs=RLHF),
    "ppo": StageSpec("posttrain.rlhf", LOOP + RL + ("--config.algorithm=ppo",),
                     ("rollout", "step", "checkpoint"), needs=RLHF),
}
PATTERNS = {"step": re.compile(r"^\[(\d+)/\d+\]"), "checkpoint": re.compile(r"writing checkpoint"),
            "rollout": re.compile(r"sampling rollout")}


def command(stage: str, workdir: str, prerequisites: dict) -> list:
  """The stage's command line on `workdir` (INFO logging on: the kill points are log lines);
  `prerequisites`: stage -> the work directory of its uninterrupted run."""
  spec = STAGES[stage]
  cmd = [sys.executable, "-m", spec.module, f"--workdir={workdir}", "--verbosity=0", *spec.flags]
  return cmd + [f"--config.{flag}={prerequisites[need]}" for flag, need in spec.needs]


def environment(cache_dir: str) -> dict:
  """The runs' environment: this checkout first on the path, CPU, one shared compilation cache."""
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_to_end(cmd: list, env: dict, timeout: float = 900) -> str:
  """Runs `cmd` to the end; its output (stdout and stderr), or an error with the output's tail."""
  done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=timeout)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd[2:4])} exited with {done.returncode}:\n{done.stdout[-4000:]}")
  return done.stdout


def complete_checkpoints(workdir: str) -> list:
  """The steps whose checkpoints are complete (orbax renames a step's directory into place once
  every file of it is written)."""
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@dataclasses.dataclass
class Kill:
  """One kill: where it was aimed and what the work directory held at that moment."""

  point: str
  occurrence: int
  delay: float
  killed: bool = False  # False: the run ended before reaching the kill point.
  last_line: str = ""
  complete: tuple = ()  # Checkpoint steps complete at the kill.
  resumed_from: int | None = None  # Filled in from the next run's output.


def _reader(stream, lines: queue.Queue) -> None:
  for line in stream:
    lines.put(line)
  lines.put(None)


def _flag(stage: str, name: str) -> int:
  """The integer value of `--config.NAME` in the stage's flags."""
  prefix = f"--config.{name}="
  return int(next(f for f in STAGES[stage].flags if f.startswith(prefix))[len(prefix):])


def kill_once(cmd: list, env: dict, workdir: str, kill: Kill, timeout: float = 900) -> tuple:
  """Runs `cmd`, SIGKILLs its process group `kill.delay` seconds after the `kill.occurrence`-th
  line of `kill.point`; (kill, the run's output)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
  output, seen, deadline = [], 0, time.time() + timeout
  try:
    while time.time() < deadline:
      try:
        line = lines.get(timeout=1.0)
      except queue.Empty:
        continue
      if line is None:
        break
      output.append(line)
      if PATTERNS[kill.point].search(line):
        seen += 1
        if seen == kill.occurrence:
          time.sleep(kill.delay)
          try:
            os.killpg(proc.pid, signal.SIGKILL)
          except ProcessLookupError:  # It had ended.
            pass
          proc.wait()
          kill.killed = proc.returncode == -signal.SIGKILL
          kill.last_line = line.strip()
          kill.complete = tuple(complete_checkpoints(workdir))
          break
  finally:
    if proc.poll() is None:  # Timed out, or the harness was interrupted.
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  if not kill.killed and proc.returncode:
    raise RuntimeError(f"{' '.join(cmd[2:4])} exited with {proc.returncode} before its kill "
                       f"point:\n{''.join(output)[-4000:]}")
  return kill, "".join(output)


def final_state(workdir: str) -> dict:
  """{name: array} of the newest checkpoint's train state, and its data iterator state."""
  import orbax.checkpoint as ocp
  step = complete_checkpoints(workdir)[-1]
  path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step)))
  with ocp.StandardCheckpointer() as reader:
    state = reader.restore(os.path.join(path, "state"))
  flat = {}

  def visit(prefix, node):
    if isinstance(node, dict):
      for k in sorted(node):
        visit(f"{prefix}/{k}", node[k])
    elif isinstance(node, (list, tuple)):
      for i, child in enumerate(node):
        visit(f"{prefix}/{i}", child)
    else:
      flat[prefix] = np.asarray(node)
  visit("state", state)
  with open(os.path.join(path, "data", "metadata")) as f:
    flat["data"] = json.load(f)
  return dict(step=step, arrays=flat)


def logged(workdir: str) -> dict:
  """step -> the logged metrics of that step, timings left out."""
  from train.metrics import read_metrics
  return {row["step"]: {k: v for k, v in row.items() if not TIMING.search(k)}
          for row in read_metrics(workdir)}


def _same(a, b) -> bool:
  if isinstance(a, float) and isinstance(b, float):
    return a == b or (math.isnan(a) and math.isnan(b))
  return a == b


def differences(reference: str, workdir: str) -> list:
  """What differs between an uninterrupted run's work directory and a killed-and-resumed one."""
  out = []
  want, got = final_state(reference), final_state(workdir)
  if want["step"] != got["step"]:
    out.append(f"final checkpoint step {got['step']}, uninterrupted {want['step']}")
  for name in sorted(set(want["arrays"]) | set(got["arrays"])):
    a, b = want["arrays"].get(name), got["arrays"].get(name)
    if name == "data":
      if a != b:
        out.append(f"data iterator state {b}, uninterrupted {a}")
    elif a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
      out.append(f"{name}: missing or reshaped")
    elif a.tobytes() != b.tobytes():
      out.append(f"{name}: differs (max |diff| {np.max(np.abs(a.astype(np.float64) - b)):.3g})")
  rows_want, rows_got = logged(reference), logged(workdir)
  if sorted(rows_want) != sorted(rows_got):
    out.append(f"logged steps {sorted(rows_got)}, uninterrupted {sorted(rows_want)}")
  for step in sorted(set(rows_want) & set(rows_got)):
    for key in sorted(set(rows_want[step]) | set(rows_got[step])):
      a, b = rows_want[step].get(key), rows_got[step].get(key)
      if not _same(a, b):
        out.append(f"step {step} {key}: {b!r}, uninterrupted {a!r}")
  return out


def step_seconds(workdir: str) -> float:
  """The median seconds per step of a run (what a random in-step delay is drawn from)."""
  from train.metrics import read_metrics
  seconds = [r["seconds_per_step"] for r in read_metrics(workdir)[1:]]
  return float(np.median(seconds)) if seconds else 1.0


def reference_run(stage: str, root: str, env: dict) -> tuple:
  """(work directory, prerequisites) of the uninterrupted run of `stage` under `root`, after those
  of the stages it starts from; each is reused once complete."""
  prerequisites = {}
  for _, need in STAGES[stage].needs:
    prerequisites[need] = reference_run(need, root, env)[0]
  workdir = os.path.join(root, stage, "reference")
  if not os.path.exists(os.path.join(workdir, "done")):
    shutil.rmtree(workdir, ignore_errors=True)
    run_to_end(command(stage, workdir, prerequisites), env)
    open(os.path.join(workdir, "done"), "w").close()
  return workdir, prerequisites


def round_of_kills(stage: str, workdir: str, env: dict, points: list, rng, seconds: float,
                   total_steps: int, prerequisites: dict) -> list:
  """One work directory killed once at each of `points` (a random occurrence and delay each), then
  run to the end. Each kill records where the following run resumed from."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = command(stage, workdir, prerequisites)
  kills = []
  for point in points:
    done = (complete_checkpoints(workdir) or [0])[-1]  # Where the next run resumes.
    left = total_steps - done
    if point == "step":  # After the progress line of a random step still to come.
      kill = Kill(point, int(rng.integers(1, max(2, left))), float(rng.uniform(0, seconds)))
    else:  # A write or a rollout still to come has just begun: a short random delay into it.
      every = _flag(stage, "checkpoint_every") if point == "checkpoint" else (
          _flag(stage, "rollout.minibatches"))
      kill = Kill(point, int(rng.integers(1, max(2, left // every + 1))),
                  float(rng.uniform(0, 0.05)))
    kill, output = kill_once(cmd, env, workdir, kill)
    if kills:
      kills[-1].resumed_from = _resumed_from(output)
    kills.append(kill)
    if not kill.killed:
      break
  if kills[-1].killed:
    kills[-1].resumed_from = _resumed_from(run_to_end(cmd, env))
  return kills


def _resumed_from(output: str) -> int | None:
  """The step a run's output says it resumed from; None for a fresh start."""
  resumed = RESUMED.search(output)
  return int(resumed.group(1)) if resumed else None


def check_round(kills: list, reference: str, workdir: str) -> list:
  """The round's failures: a resume from anything but the newest complete checkpoint, and every
  difference from the uninterrupted run."""
  failures = []
  for kill in kills:
    if not kill.killed:
      continue
    expected = kill.complete[-1] if kill.complete else None
    if kill.resumed_from != expected:
      failures.append(f"killed at {kill.point} #{kill.occurrence} (+{kill.delay:.2f}s, after "
                      f"{kill.last_line!r}) with checkpoints {list(kill.complete)}: resumed from "
                      f"{kill.resumed_from}, expected {expected}")
  return failures + differences(reference, workdir)


def kill_round(stage: str, root: str, points: list, rng, number: int = 0) -> dict:
  """One round: a fresh work directory of `stage` under `root`, killed once at each of `points`
  and run to the end, checked against the uninterrupted run; {stage, round, failures, kills}."""
  env = environment(os.path.join(root, "jax_cache"))
  reference, prerequisites = reference_run(stage, root, env)
  workdir = os.path.join(root, stage, f"killed_{number}")
  done = round_of_kills(stage, workdir, env, points, rng, step_seconds(reference),
                        max(logged(reference)), prerequisites)
  return dict(stage=stage, round=number, failures=check_round(done, reference, workdir),
              kills=[dataclasses.asdict(k) for k in done])


def soak(stage: str, kills: int, seed: int, root: str, kills_per_run: int = 3) -> list:
  """`kills` kills of `stage` at random kill points, in rounds of `kills_per_run`; one result
  dict per round."""
  rng = np.random.default_rng([seed, list(STAGES).index(stage)])
  results, left = [], kills
  while left > 0:
    points = [str(p) for p in rng.choice(STAGES[stage].kill_points, size=min(kills_per_run, left))]
    results.append(kill_round(stage, root, points, rng, len(results)))
    left -= max(1, sum(k["killed"] for k in results[-1]["kills"]))
  return results


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--stage", default="all", choices=["all", *STAGES])
  parser.add_argument("--kills", type=int, default=6, help="kills per stage")
  parser.add_argument("--kills_per_run", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default="/tmp/kill_harness")
  args = parser.parse_args(argv)
  stages = list(STAGES) if args.stage == "all" else [args.stage]
  failed = 0
  for stage in stages:
    for result in soak(stage, args.kills, args.seed, args.root, args.kills_per_run):
      print(json.dumps(result), flush=True)
      failed += bool(result["failures"])
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
