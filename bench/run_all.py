"""Every benchmark in one command, into one JSON file: the training step against transformers
(ratio, MFU against a measured matmul peak), MoE scaling from 8 to 64 experts against a dense
one-hot baseline, decode (absorbed, expanded, transformers) with cache bytes against MHA, and the
SFT, DPO and GRPO steps against TRL (GRPO split into rollout and train time), and sandbox programs
per second, and speculative decoding with the MTP head. Each benchmark runs as its own process, one after the other (time
nothing else meanwhile); a failed one is recorded with its error and the rest still run.

  .venv/bin/python -m bench.run_all --out=bench/results.json
  .venv/bin/python -m bench.run_all --only=moe_scaling,posttrain_step
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

# (module under bench/, its flags): the sizes behind README's benchmark table.
BENCHMARKS = (
    ("pretrain_step", ["--shapes=bench-tiny,bench-small", "--steps=5"]),
    ("moe_scaling", ["--experts=8,16,32,64", "--steps=5"]),
    ("generate", ["--batches=1,32", "--contexts=128,2048", "--new_tokens=32", "--rounds=2"]),
    ("posttrain_step", ["--stages=sft,dpo,grpo", "--steps=10"]),
    ("sandbox", ["--programs=64", "--workers=1,2,4"]),
    # Needs a trained MTP head: the demo's pre-training run (`make demo`), else recorded as failed.
    ("speculative", ["--checkpoint=workdir/demo/base", "--batches=1,32", "--rounds=3"]),
)

_OUT = flags.DEFINE_string("out", "bench/results.json", "The JSON file written.")
_ONLY = flags.DEFINE_list("only", [], "Run only these benchmarks (default: all); the other "
                          "entries of an existing --out file are kept.")


def run_benchmark(module: str, args: list[str]) -> dict:
  """Runs `python -m bench.MODULE ARGS`; its JSON lines as `results`, or the error."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], capture_output=True,
                        text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  results = []
  for line in proc.stdout.splitlines():  # JSON objects; other printed lines (a peer's logs) pass.
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict):
      results.append(row)
  entry = dict(command=f"python -m bench.{module} {' '.join(args)}", returncode=proc.returncode,
               seconds=time.perf_counter() - start, results=results)
  if proc.returncode:
    entry["error"] = proc.stderr[-4000:]
  return entry


def main(argv):
  del argv
  known = [name for name, _ in BENCHMARKS]
  unknown = sorted(set(_ONLY.value) - set(known))
  if unknown:
    raise ValueError(f"--only: unknown benchmarks {unknown}; known: {', '.join(known)}")
  import jax
  report = dict(date=datetime.date.today().isoformat(), host=platform.node(),
                device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(), benchmarks={})
  if _ONLY.value and os.path.exists(_OUT.value):  # A partial re-run keeps the other entries.
    with open(_OUT.value) as f:
      report["benchmarks"] = json.load(f)["benchmarks"]
  for name, args in BENCHMARKS:
    if _ONLY.value and name not in _ONLY.value:
      continue
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    report["benchmarks"][name] = entry = run_benchmark(name, args)
    status = "ok" if entry["returncode"] == 0 else f"FAILED (exit {entry['returncode']})"
    print(f"bench: {name} {status} in {entry['seconds']:.0f} s", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value + ".tmp", "w") as f:  # Written after each benchmark: nothing lost.
      json.dump(report, f, indent=2)
    os.replace(_OUT.value + ".tmp", _OUT.value)
  for name, entry in report["benchmarks"].items():
    for r in entry["results"]:
      if r.get("kind") == "ratio":
        print(json.dumps(dict(benchmark=name, **r)))
  print(f"wrote {_OUT.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
