"""Isolated execution of untrusted Python programs: what checks model-written code.

  result = run("print(input())", timeout_s=5, memory_mb=256, stdin="hi\\n")
  result.status, result.returncode, result.stdout, result.stderr, result.wall_s
  results = run_many([source, ...], timeout_s=5)          # a pool of workers
  python -m posttrain.sandbox prog.py --timeout_s=5 [--memory_mb=256] [--stdin_file=F]

Each program runs in posttrain/sandbox_launcher.py's fresh Linux namespaces (user, PID, network,
mount, IPC, UTS) as an unprivileged user (nobody when the caller is root), in a new root that
holds only read-only system directories, the interpreter's own prefix, /dev/null, /dev/zero,
/dev/(u)random, a fresh /proc of its own PID namespace and a private empty tmpfs /work (also
/tmp). Limits: CPU seconds, address space, file size, processes, open files, the tmpfs size, the
output bytes, and a wall clock after which the whole PID namespace is killed. No capability and
no environment variable of the caller survive. Status: "ok" (exit 0), "error" (non-zero exit or a
signal), "timeout" (wall clock or CPU limit), "memory" (MemoryError under the address-space limit),
"output_limit" (stdout + stderr past the cap; the program is killed).

Where the kernel refuses unprivileged user namespaces, `run` raises SandboxUnavailable saying why
and how to allow them, unless the caller passes isolation="rlimits" (rlimits and a private
temporary directory only: no file, network or process isolation). Nothing here calls eval or
exec on program text in this process.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
ISOLATIONS = ("namespaces", "rlimits")
STATUSES = ("ok", "error", "timeout", "memory", "output_limit")
NOBODY = 65534
PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/work",
               "PYTHONIOENCODING": "utf-8"}
ENABLE_HINT = ("allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on "
               "Ubuntu 23.10+ also kernel.apparmor_restrict_unprivileged_userns=0; in a container, "
               "a seccomp profile that permits unshare/clone with CLONE_NEWUSER), or pass "
               "isolation='rlimits' to accept rlimits-only isolation")


class SandboxUnavailable(RuntimeError):
  """Programs cannot be run in isolation here; the message says why and how to enable it."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """The outcome of one program."""

  status: str  # One of STATUSES.
  returncode: int | None  # Exit code; -N for signal N; None when killed by the sandbox.
  stdout: str
  stderr: str
  wall_s: float
  isolation: str  # "namespaces" or "rlimits".

  @property
  def ok(self) -> bool:
    return self.status == "ok"


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits."""

  timeout_s: float = 5.0  # Wall clock; the CPU limit is this, rounded up, plus one second.
  memory_mb: int = 256  # Address space.
  file_size_mb: int = 16  # Largest file the program may write.
  disk_mb: int = 32  # Size of its /work tmpfs (namespaces).
  max_processes: int = 16  # Processes and threads of the sandbox user beyond the caller's own.
  open_files: int = 64
  output_bytes: int = 1 << 20  # stdout + stderr.


@functools.lru_cache(maxsize=None)
def _interpreter() -> tuple[str, tuple[str, ...]]:
  """The real Python binary (through any venv link) and the prefixes it needs."""
  python = os.path.realpath(sys.executable)
  paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
  paths.add(os.path.dirname(os.path.dirname(python)))
  return python, tuple(sorted(paths))


def _tasks_of(uid: int) -> int:
  """Processes and threads of `uid` now (RLIMIT_NPROC counts them all)."""
  count = 0
  for pid in os.listdir("/proc"):
    if pid.isdigit():
      try:
        if os.stat(f"/proc/{pid}").st_uid == uid:
          count += len(os.listdir(f"/proc/{pid}/task"))
      except OSError:
        pass
  return count


def _collect(proc: subprocess.Popen, status_r: int, limit: int, deadline: float):
  """Reads the launcher's stdout, stderr and status pipes until all close, the output passes
  `limit` bytes, or `deadline`; returns (stdout, stderr, status lines, why it stopped early)."""
  buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(),
             status_r: bytearray()}
  with selectors.DefaultSelector() as sel:
    for fd in buffers:
      os.set_blocking(fd, False)
      sel.register(fd, selectors.EVENT_READ)
    stopped = None
    while sel.get_map() and stopped is None:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        stopped = "deadline"
        break
      for key, _ in sel.select(remaining):
        chunk = os.read(key.fd, 1 << 16)
        if not chunk:
          sel.unregister(key.fd)
          continue
        buffers[key.fd] += chunk
        if len(buffers[proc.stdout.fileno()]) + len(buffers[proc.stderr.fileno()]) > limit:
          stopped = "output_limit"
  if stopped:
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # The launcher; init and the program die with it.
    except ProcessLookupError:
      pass
  proc.wait()
  decode = lambda b: bytes(b).decode("utf-8", "replace")
  status = [json.loads(line) for line in decode(buffers[status_r]).splitlines() if line.strip()]
  return (decode(buffers[proc.stdout.fileno()])[:limit], decode(buffers[proc.stderr.fileno()])[:limit],
          status, stopped)


def _classify(status: list[dict], stopped: str | None, stderr: str) -> tuple[str, int | None]:
  if stopped == "output_limit":
    return "output_limit", None
  merged = {k: v for line in status for k, v in line.items()}
  if "setup_error" in merged:
    raise SandboxUnavailable(f"the sandbox could not start a program: {merged['setup_error']}"
                             + (f"; {ENABLE_HINT}" if merged.get("namespaces_refused") else ""))
  if stopped == "deadline" or merged.get("timeout"):
    return "timeout", None
  program = merged.get("program")
  if program is None:
    raise RuntimeError(f"sandbox launcher ended without an outcome (stderr: {stderr[-500:]!r})")
  if "signal" in program:
    sig = program["signal"]
    return ("timeout" if sig == signal.SIGXCPU else "error"), -sig  # SIGXCPU: the CPU limit.
  code = program["exit"]
  if code == 0:
    return "ok", 0
  tail = stderr.strip().splitlines()[-1:] or [""]
  return ("memory" if tail[0].startswith("MemoryError") else "error"), code


def run(source: str, *, stdin: str = "", isolation: str = "namespaces", limits: Limits | None = None,
        **limit_fields) -> SandboxResult:
  """Runs the Python program `source` in the sandbox; `limit_fields` override Limits fields
  (timeout_s=, memory_mb=, ...)."""
  if isolation not in ISOLATIONS:
    raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
  limits = dataclasses.replace(limits or Limits(), **limit_fields)
  python, interpreter_paths = _interpreter()
  mountpoint = tempfile.mkdtemp(prefix="sandbox-")
  os.chmod(mountpoint, 0o755)
  program_uid = NOBODY if os.getuid() == 0 and isolation == "namespaces" else os.getuid()
  status_r, status_w = os.pipe()
  job = dict(source=source, stdin=stdin, isolation=isolation, mountpoint=mountpoint,
             python=python, interpreter_paths=list(interpreter_paths), env=PROGRAM_ENV,
             status_fd=status_w, timeout_s=limits.timeout_s, memory_mb=limits.memory_mb,
             file_size_mb=limits.file_size_mb, disk_mb=limits.disk_mb,
             open_files=limits.open_files,
             max_processes=limits.max_processes + _tasks_of(program_uid))
  start = time.monotonic()
  try:
    proc = subprocess.Popen([python, "-I", "-S", "-B", LAUNCHER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                            env={"PATH": PROGRAM_ENV["PATH"]}, cwd="/", start_new_session=True)
    os.close(status_w)
    status_w = None
    proc.stdin.write(json.dumps(job).encode())
    proc.stdin.close()
    stdout, stderr, status, stopped = _collect(proc, status_r, limits.output_bytes,
                                               start + limits.timeout_s + 2.0)
  finally:
    os.close(status_r)
    if status_w is not None:
      os.close(status_w)
    shutil.rmtree(mountpoint, ignore_errors=True)
  wall = time.monotonic() - start
  result_status, returncode = _classify(status, stopped, stderr)
  return SandboxResult(result_status, returncode, stdout, stderr, wall, isolation)


def run_many(sources: list[str], *, stdins: list[str] | None = None, workers: int | None = None,
             **kwargs) -> list[SandboxResult]:
  """run() over many programs at once (a pool of `workers`, default the CPU count); results in
  the order of `sources`."""
  stdins = stdins or [""] * len(sources)
  if len(stdins) != len(sources):
    raise ValueError(f"run_many: {len(stdins)} stdins for {len(sources)} sources")
  workers = workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda a: run(a[0], stdin=a[1], **kwargs), zip(sources, stdins)))


@functools.lru_cache(maxsize=None)
def namespaces_available() -> tuple[bool, str]:
  """(True, "") when a trivial program runs under isolation="namespaces"; else (False, why)."""
  try:
    result = run("print('ok')", timeout_s=10)
  except SandboxUnavailable as e:
    return False, str(e)
  if result.stdout.strip() != "ok":
    return False, f"a trivial program failed in the sandbox: {result}"
  return True, ""


if __name__ == "__main__":
  from absl import app, flags
  _TIMEOUT = flags.DEFINE_float("timeout_s", 5.0, "Wall-clock limit, seconds.")
  _MEMORY = flags.DEFINE_integer("memory_mb", 256, "Address-space limit, MiB.")
  _STDIN = flags.DEFINE_string("stdin_file", "", "A file whose text is the program's stdin.")
  _ISOLATION = flags.DEFINE_enum("isolation", "namespaces", ISOLATIONS,
                                 "rlimits: accept rlimits-only isolation.")

  def main(argv):
    if len(argv) != 2:
      raise app.UsageError("usage: python -m posttrain.sandbox FILE --timeout_s=S")
    with open(argv[1]) as f:
      source = f.read()
    stdin = ""
    if _STDIN.value:
      with open(_STDIN.value) as f:
        stdin = f.read()
    result = run(source, stdin=stdin, isolation=_ISOLATION.value, timeout_s=_TIMEOUT.value,
                 memory_mb=_MEMORY.value)
    print(json.dumps(dataclasses.asdict(result)))
  app.run(main)
