"""The sandbox's launcher: run by posttrain/sandbox.py as `python -I -S -B sandbox_launcher.py`,
never imported. Standard library only.

It reads one JSON job from stdin, then (isolation "namespaces") enters fresh mount, PID, network,
IPC and UTS namespaces (and a user namespace when the caller is not root) and forks the
namespace's init. Init builds a new root on a tmpfs (system directories and the interpreter's
prefix bound read-only, a private empty /work, a fresh /proc, /dev/null and friends), pivots into
it, empties the capability bounding set, becomes nobody when it was real root, and forks the
program with rlimits and a scrubbed environment. When init ends, the kernel kills every process
left in the namespace. The launcher enforces the wall-clock limit by killing init. Isolation
"rlimits" skips the namespaces: the program runs as the caller in a private temporary directory
with rlimits only.

Outcome lines (JSON) go to the status descriptor the job names: {"setup_error": why},
{"program": {"exit": code} | {"signal": number}}, {"timeout": true}.
"""

import ctypes
import json
import os
import platform
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
NOBODY = 65534
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # pivot_root has no libc wrapper.
# statvfs flags -> mount flags: a read-only remount in a user namespace must keep these.
LOCKED_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                (os.ST_RELATIME, MS_RELATIME))
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("null", "zero", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
libc.prctl.argtypes = (ctypes.c_int,) + (ctypes.c_ulong,) * 4


def _check(result: int, what: str) -> None:
  if result != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else s.encode()
  _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
         f"mount {source or ''} on {target}")


def _prctl(option: int, arg: int = 0) -> None:
  _check(libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def enter_namespaces() -> None:
  """New mount, PID, network, IPC and UTS namespaces; for a caller that is not root also a user
  namespace mapping it to root inside (root drops to nobody once the new root is built)."""
  flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
  if os.getuid() == 0:
    _check(libc.unshare(flags), "unshare(mount, pid, net, ipc, uts namespaces)")
    return
  uid, gid = os.getuid(), os.getgid()
  _check(libc.unshare(flags | CLONE_NEWUSER), "unshare(user, mount, pid, net, ipc, uts namespaces)")
  _write("/proc/self/setgroups", "deny")
  _write("/proc/self/uid_map", f"0 {uid} 1")
  _write("/proc/self/gid_map", f"0 {gid} 1")


def drop_privileges(real_root: bool, last_cap: int) -> None:
  """Empties the capability bounding set (nothing regains a capability through exec), then, for
  real root, becomes nobody; sets no-new-privileges."""
  for cap in range(last_cap + 1):
    _prctl(PR_CAPBSET_DROP, cap)
  if real_root:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
  _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _bind_read_only(source: str, target: str) -> None:
  _mount(source, target, None, MS_BIND | MS_REC)
  locked = os.statvfs(target).f_flag
  extra = 0
  for st_flag, ms_flag in LOCKED_FLAGS:
    if locked & st_flag:
      extra |= ms_flag
  _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | extra)


def build_root(job: dict, real_root: bool) -> None:
  """The new root: a read-only tmpfs holding read-only binds of the system and interpreter paths,
  /dev nodes, a fresh /proc and a writable tmpfs /work (the working directory); then pivot."""
  root = job["mountpoint"]
  _mount(None, "/", None, MS_REC | MS_PRIVATE)
  _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  bound = []
  for path in list(SYSTEM_PATHS) + job["interpreter_paths"]:
    if not os.path.lexists(path) or any(path == b or path.startswith(b + "/") for b in bound):
      continue
    target = root + path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(path):
      os.symlink(os.readlink(path), target)
      continue
    if os.path.isdir(path):
      os.makedirs(target, exist_ok=True)
    else:
      open(target, "w").close()
    _bind_read_only(path, target)
    bound.append(path)
  os.makedirs(root + "/dev")
  for name in DEVICES:
    open(f"{root}/dev/{name}", "w").close()
    _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
  os.makedirs(root + "/proc")
  try:  # A fresh /proc shows this PID namespace only; some kernels refuse it in a user namespace.
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  except OSError:
    pass
  os.makedirs(root + "/work")
  _mount("tmpfs", root + "/work", "tmpfs", MS_NOSUID | MS_NODEV,
         f"size={job['disk_mb']}m,mode=0755,nr_inodes=4096"
         + (f",uid={NOBODY},gid={NOBODY}" if real_root else ""))
  os.symlink("/work", root + "/tmp")
  os.makedirs(root + "/.old")
  os.chdir(root)
  _check(libc.syscall(SYS_PIVOT_ROOT[platform.machine()], b".", b".old"), "pivot_root")
  _check(libc.umount2(b"/.old", MNT_DETACH), "umount old root")
  os.rmdir("/.old")
  _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chdir("/work")
  libc.sethostname(b"sandbox", 7)


def _limit(kind: int, value: int) -> None:
  resource.setrlimit(kind, (value, value))


def exec_program(job: dict, stdin_fd: int, workdir: str, report) -> None:
  """In the forked program process: stdin, rlimits, then exec Python on main.py; an exec failure
  is reported as a setup error (never as the program's own failure)."""
  try:
    os.dup2(stdin_fd, 0)
    os.set_inheritable(job["status_fd"], False)
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
      if int(fd) > 2 and int(fd) != job["status_fd"]:
        try:
          os.close(int(fd))
        except OSError:
          pass
    os.chdir(workdir)
    cpu = int(job["timeout_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    _limit(resource.RLIMIT_AS, job["memory_mb"] << 20)
    _limit(resource.RLIMIT_FSIZE, job["file_size_mb"] << 20)
    _limit(resource.RLIMIT_NOFILE, job["open_files"])
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, job["max_processes"])
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    python = job["python"]
    os.execve(python, [python, "-I", "-S", "-B", "main.py"], job["env"])
  except BaseException as e:
    report(setup_error=f"starting the program: {type(e).__name__}: {e}")
  os._exit(127)


def _wait(pid: int, deadline: float | None) -> tuple[dict, bool]:
  """(wait outcome, timed out) for child `pid`, killing it at `deadline`."""
  fd = os.pidfd_open(pid)
  timed_out = False
  while True:
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([fd], [], [], remaining)
    if not ready and not timed_out:
      os.kill(pid, signal.SIGKILL)
      timed_out = True
      continue
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    if os.WIFSIGNALED(status):
      return {"signal": os.WTERMSIG(status)}, timed_out
    return {"exit": os.WEXITSTATUS(status)}, timed_out


def main() -> None:
  job = json.loads(sys.stdin.buffer.read())
  status_fd = job["status_fd"]
  report = lambda **kw: os.write(status_fd, (json.dumps(kw) + "\n").encode())
  stdin_fd = os.memfd_create("stdin")
  os.write(stdin_fd, job["stdin"].encode())
  os.lseek(stdin_fd, 0, os.SEEK_SET)
  namespaces = job["isolation"] == "namespaces"
  real_root = os.getuid() == 0
  last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
  if namespaces:
    try:
      enter_namespaces()
    except OSError as e:
      report(setup_error=str(e), namespaces_refused=True)
      return
  deadline = time.monotonic() + job["timeout_s"]
  init = os.fork()
  if init == 0:  # Init of the new PID namespace (rlimits only: the program itself).
    try:
      if namespaces:
        build_root(job, real_root)
        drop_privileges(real_root, last_cap)
        workdir = "/work"
      else:
        os.setsid()
        workdir = job["mountpoint"]
      _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # After setuid, which clears it.
      with open(os.path.join(workdir, "main.py"), "w") as f:
        f.write(job["source"])
      if not namespaces:
        exec_program(job, stdin_fd, workdir, report)
      program = os.fork()
      if program == 0:
        exec_program(job, stdin_fd, workdir, report)
      outcome, _ = _wait(program, None)
      report(program=outcome)
    except BaseException as e:  # Anything before the program starts is a setup failure.
      report(setup_error=f"{type(e).__name__}: {e}")
    os._exit(0)
  outcome, timed_out = _wait(init, deadline)
  if timed_out:
    if not namespaces:
      try:  # The program's process group: rlimits-only runs have no namespace to take down.
        os.killpg(init, signal.SIGKILL)
      except OSError:
        pass
    report(timeout=True)
  elif not namespaces:
    report(program=outcome)


if __name__ == "__main__":
  main()
