"""Building and loading the C++ XLA:CPU kernels under kernels/csrc, shared by every native kernel.

A kernel is built from source on first use with the system's C++ compiler (`CXX`, else `g++`,
`c++` or `clang++`), `-O3 -march=native`, into a cache directory (`DEEPJAX_KERNEL_CACHE`, default
`~/.cache/deepjax/kernels`) keyed by its source and the headers it includes, the flags, the
compiler's version, jaxlib and the CPU; later processes load the cached library. `NativeLibrary`
registers a library's FFI targets once per process and, where no compiler works, says why, so the
caller can fall back to a pure-JAX path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import metadata
from pathlib import Path

import jax

CSRC = Path(__file__).parent / "csrc"
HEADERS = (CSRC / "cpu_common.h",)  # Included by every kernel: part of each build's identity.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def cache_dir() -> Path:
  """Where built kernels are kept."""
  return Path(os.environ.get("DEEPJAX_KERNEL_CACHE",
                             Path.home() / ".cache" / "deepjax" / "kernels"))


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return name
  return None


def _cpu_signature() -> str:
  """The CPU's feature flags (what -march=native compiles for), or the machine name."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.machine() + platform.processor()


def build(source: Path) -> Path:
  """Compiles `source` (unless a cached build exists) and returns the shared library's path.

  Raises RuntimeError naming the compiler command and its output when the build fails; a failed
  build leaves nothing in the cache.
  """
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
  include = jax.ffi.include_dir()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  identity = [source.read_text(), *(h.read_text() for h in HEADERS), " ".join(FLAGS), compiler,
              version, metadata.version("jaxlib"), _cpu_signature()]
  key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
  target = cache_dir() / f"{source.stem}_{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = Path(tmp) / target.name
    cmd = [compiler, *FLAGS, "-isystem", include, "-I", str(CSRC), "-o", str(partial),
           str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"building {source.name} failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    os.replace(partial, target)  # Atomic: concurrent builders each install a whole library.
  return target


class NativeLibrary:
  """One kernel source's library: built, loaded and its FFI targets registered on first use.

  `targets` maps each FFI target name to the exported handler symbol it registers.
  """

  def __init__(self, source: Path, targets: dict[str, str]):
    self.source, self.targets = source, targets
    self._lock = threading.Lock()
    self._state: dict = {}  # "library": the loaded library once registered, or "error": why not.

  def build(self) -> Path:
    """Compiles the library if needed (`build`); returns its path."""
    return build(self.source)

  def _register(self) -> None:
    import ctypes  # Deferred: only needed here.
    with self._lock:
      if self._state:
        return
      try:
        library = ctypes.cdll.LoadLibrary(str(self.build()))
        for name, symbol in self.targets.items():
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                      platform="cpu")
        self._state["library"] = library
      except (RuntimeError, OSError, AttributeError) as e:
        self._state["error"] = str(e)

  def available(self) -> bool:
    """Whether the library is built and its targets registered in this process (builds it)."""
    self._register()
    return "library" in self._state

  def unavailable_reason(self) -> str | None:
    """Why the library could not be built or loaded, or None when it is available."""
    self._register()
    return self._state.get("error")
