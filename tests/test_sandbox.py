"""The sandbox: honest programs run correctly; hostile ones are contained, score 0 and leave the
host unchanged (posttrain/sandbox.py)."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from posttrain import sandbox
from posttrain.tasks import get_task

available, why = sandbox.namespaces_available()
needs_namespaces = pytest.mark.skipif(not available, reason=f"no namespaces here: {why}")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gone(marker: str, wait_s: float = 3.0) -> bool:
  """True once no host process has `marker` in its command line (waits up to wait_s)."""
  deadline = time.monotonic() + wait_s
  while time.monotonic() < deadline:
    alive = False
    for pid in filter(str.isdigit, os.listdir("/proc")):
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          alive |= marker.encode() in f.read()
      except OSError:
        pass
    if not alive:
      return True
    time.sleep(0.1)
  return False


@needs_namespaces
def test_honest_programs_run_with_stdin_and_in_order():
  result = sandbox.run("import sys\nn = int(sys.stdin.readline())\nprint(sum(range(n)))\n"
                       "print('to stderr', file=sys.stderr)\nraise SystemExit(3)", stdin="10\n")
  assert (result.status, result.returncode) == ("error", 3)
  assert result.stdout == "45\n" and result.stderr == "to stderr\n"
  results = sandbox.run_many([f"print({i} * {i})" for i in range(6)], workers=3)
  assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]
  assert all(r.ok and r.isolation == "namespaces" for r in results)
  # Its own directory is private, empty and writable; the files it writes stay there.
  result = sandbox.run("import os\nassert os.listdir('.') == ['main.py'], os.listdir('.')\n"
                       "open('out.txt', 'w').write('x' * 1000)\nprint(os.getcwd(), "
                       "os.path.getsize('out.txt'))")
  assert result.ok and result.stdout == "/work 1000\n", result


@needs_namespaces
@pytest.mark.parametrize("source,status", [
    ("while True:\n  pass", "timeout"),
    ("import time\ntime.sleep(60)", "timeout"),
    ("x = bytearray(2 << 30)", "memory"),
    ("import sys\nwhile True:\n  sys.stdout.write('x' * 65536)", "output_limit"),
])
def test_runaway_programs_are_stopped(source, status):
  result = sandbox.run(source, timeout_s=1.0, memory_mb=128)
  assert result.status == status, result
  assert result.wall_s < 5


@needs_namespaces
def test_process_and_thread_bombs_are_contained():
  marker = secrets.token_hex(8)
  fork_bomb = ("import os, sys\n"
               f"sys.argv.append('{marker}')\n"
               "while True:\n"
               "  try:\n"
               "    os.fork()\n"
               "  except OSError:\n"
               "    pass\n")
  result = sandbox.run(fork_bomb, timeout_s=2.0)
  assert result.status == "timeout", result
  thread_bomb = ("import threading, time\n"
                 "for _ in range(10000):\n"
                 "  threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
  result = sandbox.run(thread_bomb, timeout_s=2.0)
  assert result.status in ("error", "memory"), result
  assert "can't start new thread" in result.stderr or "MemoryError" in result.stderr
  assert subprocess.run(["true"]).returncode == 0  # The host still forks.


@needs_namespaces
def test_a_double_forked_daemon_dies_with_the_sandbox():
  marker = secrets.token_hex(8)
  daemon = ("import os, sys\n"
            "if os.fork() == 0:\n"
            "  os.setsid()\n"
            "  if os.fork() == 0:\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
            "  os._exit(0)\n"
            "print('parent done')\n")
  result = sandbox.run(daemon, timeout_s=5.0)
  assert result.ok and result.stdout == "parent done\n"
  assert _gone(marker), "the daemon outlived its sandbox"


@needs_namespaces
def test_big_files_and_writes_outside_its_directory_fail(tmp_path):
  big = ("with open('big', 'wb') as f:\n"
         "  for _ in range(4096):\n"
         "    f.write(b'0' * (1 << 20))\n")
  result = sandbox.run(big, timeout_s=10.0)
  assert result.status == "error" and "File too large" in result.stderr, result
  targets = ["/tmp/escape", "/usr/escape", "/etc/escape", os.path.join(_ROOT, "escape"),
             str(tmp_path / "escape"), os.path.expanduser("~/escape"), "/escape"]
  writer = (f"written = []\nfor path in {targets!r}:\n  try:\n    open(path, 'w').write('x')\n"
            "    written.append(path)\n  except OSError:\n    pass\nprint(written)")
  result = sandbox.run(writer)
  assert result.ok, result
  assert all(not os.path.exists(p) for p in targets if p != "/tmp/escape")
  assert not os.path.exists("/tmp/escape") or os.path.getmtime("/tmp/escape") < time.time() - 60
  # /tmp inside is its own /work: whatever it wrote there is gone with it.
  assert set(eval(result.stdout)) <= {"/tmp/escape"}  # noqa: S307 - our own printed list


@needs_namespaces
def test_secrets_of_the_host_are_not_readable(tmp_path, monkeypatch):
  secret = secrets.token_hex(16)
  monkeypatch.setenv("SANDBOX_TEST_SECRET", secret)
  host_tmp = f"/tmp/sandbox-test-{secret}.txt"
  with open(host_tmp, "w") as f:
    f.write(secret)
  (tmp_path / "secret.txt").write_text(secret)
  reader = ("import glob, os\nfound = []\n"
            "for pattern in ['/tmp/*', '/proc/*/environ', '/proc/*/cmdline', "
            f"'{tmp_path}/*', '{_ROOT}/*', '/root/*', '/home/*/*', '/etc/*']:\n"
            "  for path in glob.glob(pattern):\n"
            "    try:\n"
            "      found.append(open(path, 'rb').read(4096).decode('latin-1'))\n"
            "    except OSError:\n"
            "      pass\n"
            "print(dict(os.environ), found, sorted(os.listdir('/proc')))\n")
  try:
    result = sandbox.run(reader)
  finally:
    os.remove(host_tmp)
  assert result.ok, result
  assert secret not in result.stdout
  assert str(os.getpid()) + "'" not in result.stdout.split("] [")[-1]  # Host PIDs are not listed.


@needs_namespaces
def test_no_network_and_no_signals_to_the_host():
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.setblocking(False)
  port = server.getsockname()[1]
  victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    attacker = (f"import os, signal, socket\nout = []\n"
                f"try:\n  socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "  out.append('connected')\nexcept OSError as e:\n  out.append(type(e).__name__)\n"
                f"for pid in ({victim.pid}, {os.getpid()}, -1):\n"
                "  try:\n    os.kill(pid, signal.SIGKILL)\n    out.append('killed')\n"
                "  except OSError as e:\n    out.append(type(e).__name__)\n"
                f"print(out)")
    result = sandbox.run(attacker, timeout_s=5.0)
    assert "connected" not in result.stdout, result
    with pytest.raises(BlockingIOError):
      server.accept()
    time.sleep(0.2)
    assert victim.poll() is None, "a host process was killed from the sandbox"
  finally:
    victim.kill()
    victim.wait()
    server.close()


def test_refused_namespaces_are_an_error_that_says_how():
  with pytest.raises(sandbox.SandboxUnavailable, match="unprivileged user namespaces.*rlimits"):
    sandbox._classify([{"setup_error": "unshare: Operation not permitted",
                        "namespaces_refused": True}], None, "")
  with pytest.raises(ValueError, match="isolation must be one of"):
    sandbox.run("print(1)", isolation="none")


def test_rlimits_only_isolation_runs_and_limits():
  result = sandbox.run("print(input()[::-1])", stdin="abc\n", isolation="rlimits")
  assert result.ok and result.stdout == "cba\n" and result.isolation == "rlimits"
  assert sandbox.run("while True:\n  pass", isolation="rlimits", timeout_s=1.0).status == "timeout"


def test_cli_prints_one_json_result(tmp_path):
  program = tmp_path / "prog.py"
  program.write_text("print(input() + '!')")
  (tmp_path / "in.txt").write_text("hey\n")
  isolation = "namespaces" if available else "rlimits"
  out = subprocess.run([sys.executable, "-m", "posttrain.sandbox", str(program), "--timeout_s=5",
                        f"--stdin_file={tmp_path / 'in.txt'}", f"--isolation={isolation}"],
                       cwd=_ROOT, capture_output=True, text=True, check=True)
  result = json.loads(out.stdout)
  assert result["status"] == "ok" and result["stdout"] == "hey!\n"


@needs_namespaces
def test_program_task_scores_through_the_sandbox():
  task = get_task("program")
  problems = task.problems("test", 3)
  right = [p.solution for p in problems]
  assert [v.score for v in [task.verify(p, r) for p, r in zip(problems, right)]] == [1.0] * 3
  p = problems[0]
  name = p.prompt.split("function ")[1].split("(")[0]
  wrong = f"<think>guess</think>def {name}(*args):\n    return 0\n"
  fenced = f"<think>x</think>```python\n{p.answer}```"
  hostile = ["<think>x</think>while True:\n    pass\n",
             "<think>x</think>import os\nwhile True:\n    os.fork()\n",
             "<think>x</think>x = bytearray(1 << 31)\n",
             # Printing a look-alike result line does not pass: the harness's token is secret.
             f"<think>x</think>import json\nprint(json.dumps(['0' * 32, 5, 5, '']))\n"
             f"def {name}(*a):\n    return None\n"]
  verdicts = task.verify_many([p] * 6, [wrong, fenced] + hostile)
  assert [v.score for v in verdicts] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0], verdicts
  partial = get_task("program", partial_credit=True)
  half = f"<think>x</think>_n = [0]\ndef {name}(*a):\n    _n[0] += 1\n    " \
         f"return ({p.answer.split('return ')[1].strip()}) if _n[0] % 2 else None\n"
  score = partial.verify(p, half.replace("(*a)", "(" + p.answer.split("(")[1].split(")")[0] + ")"))
  assert 0.0 < score.score < 1.0, score
