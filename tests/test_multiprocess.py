"""Two processes on localhost joined by jax.distributed (gloo) agree with a single-process run."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  out = tmp_path / "results.json"
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, "-m", "tests.multiprocess_checks", str(out)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  r = json.loads(out.read_text())
  print(json.dumps(r))
  assert r["processes"] == 2 and r["mesh"] == dict(data=2, fsdp=1, expert=2, tensor=1), r
  assert len(r["losses"]) == 3
  assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"])) < 1e-5, r
  assert r["param_diff"] < 1e-5, r
