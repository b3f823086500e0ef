"""Fused flash attention for XLA:CPU: a C++ kernel (kernels/csrc/flash_attention_cpu.cc) called
through XLA's FFI, forward and a recomputing backward.

XLA:CPU cannot fuse a matmul with the softmax around it, so attention written in JAX streams each
block of scores through memory several times; that traffic, not the FLOPs, was most of the train
step's time on CPU. The kernel keeps each 32 x 64 tile of scores in cache from its matmul to its
use. It is built from source on first use with the system's C++ compiler (`CXX`, else `g++` or
`c++`), `-O3 -march=native`, into a cache directory (`DEEPJAX_KERNEL_CACHE`, default
`~/.cache/deepjax/kernels`) keyed by the source, the flags, jaxlib and the CPU; later processes load
the cached library. Where no compiler works `available()` is False with the reason in
`unavailable_reason()`, and `impl="auto"` keeps the chunked JAX path.

Numerics as `flash_attention.reference_attention`: float32 throughout (other dtypes are cast),
masked keys excluded, a query that sees no key gets a zero output and zero gradients.
"""

from __future__ import annotations

import functools
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
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).parent / "csrc" / "flash_attention_cpu.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_FORWARD, _BACKWARD = "deepjax_flash_attention_cpu_fwd", "deepjax_flash_attention_cpu_bwd"

_lock = threading.Lock()
_state: dict = {}  # "library": the loaded library once registered, or "error": why not.


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


def build() -> Path:
  """Compiles the kernel (unless a cached build exists) and returns the shared library's path.

  Raises RuntimeError naming the compiler command and its output when the build fails.
  """
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
  include = jax.ffi.include_dir()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  identity = [SOURCE.read_text(), " ".join(FLAGS), compiler, version, metadata.version("jaxlib"),
              _cpu_signature()]
  key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
  target = cache_dir() / f"flash_attention_cpu_{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = Path(tmp) / target.name
    cmd = [compiler, *FLAGS, "-isystem", include, "-o", str(partial), str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"building {SOURCE.name} failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    os.replace(partial, target)  # Atomic: concurrent builders each install a whole library.
  return target


def _register() -> None:
  """Builds and loads the library and registers its two FFI targets, once per process."""
  import ctypes  # Deferred: only needed here.
  with _lock:
    if _state:
      return
    try:
      library = ctypes.cdll.LoadLibrary(str(build()))
      jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.FlashAttentionForward),
                                  platform="cpu")
      jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(library.FlashAttentionBackward),
                                  platform="cpu")
      _state["library"] = library
    except (RuntimeError, OSError, AttributeError) as e:
      _state["error"] = str(e)


def available() -> bool:
  """Whether the CPU kernel is built and registered in this process (builds it if needed)."""
  _register()
  return "library" in _state


def unavailable_reason() -> str | None:
  """Why the kernel could not be built or loaded, or None when it is available."""
  _register()
  return _state.get("error")


def _call(name, results, *operands, scale: float, causal: bool):
  return jax.ffi.ffi_call(name, results, vmap_method="sequential")(
      *operands, scale=np.float32(scale), causal=np.int32(causal))


def _forward(q_nope, q_rope, k_nope, k_rope, v_BSNV, segment_ids_BL, scale, causal):
  b, t, n, _ = q_nope.shape
  operands = tuple(x.astype(jnp.float32) for x in (q_nope, q_rope, k_nope, k_rope, v_BSNV))
  out_BTNV, lse_BNT = _call(
      _FORWARD, (jax.ShapeDtypeStruct((b, t, n, v_BSNV.shape[-1]), jnp.float32),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      *operands, segment_ids_BL.astype(jnp.int32), scale=scale, causal=causal)
  residuals = ((q_nope, q_rope, k_nope, k_rope, v_BSNV), segment_ids_BL, out_BTNV, lse_BNT)
  return out_BTNV.astype(v_BSNV.dtype), residuals


def _backward(scale, causal, residuals, dout_BTNV):
  inputs, segment_ids_BL, out_BTNV, lse_BNT = residuals
  operands = tuple(x.astype(jnp.float32) for x in inputs)
  q_nope, q_rope, k_nope, k_rope, v_BSNV = operands
  b, s, n = k_nope.shape[:3]
  shapes = (q_nope.shape, q_rope.shape, k_nope.shape, (b, s, n, k_rope.shape[-1]), v_BSNV.shape)
  grads = _call(_BACKWARD, tuple(jax.ShapeDtypeStruct(x, jnp.float32) for x in shapes),
                *operands, segment_ids_BL.astype(jnp.int32), out_BTNV, lse_BNT,
                dout_BTNV.astype(jnp.float32), scale=scale, causal=causal)
  dq_nope, dq_rope, dk_nope, dk_rope, dv = grads
  if k_rope.shape[2] != n:  # A rotary key shared by every head: the heads' gradients add up.
    dk_rope = dk_rope.sum(2, keepdims=True)
  grads = (dq_nope, dq_rope, dk_nope, dk_rope, dv)
  return tuple(g.astype(x.dtype) for g, x in zip(grads, inputs)) + (None,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _native(q_nope, q_rope, k_nope, k_rope, v_BSNV, segment_ids_BL, scale, causal):
  return _forward(q_nope, q_rope, k_nope, k_rope, v_BSNV, segment_ids_BL, scale, causal)[0]


_native.defvjp(_forward, _backward)


def _split_heads(x):
  """(per-head part, rotary part) of queries or keys given whole ([B, L, N, H]: a zero-width
  rotary part) or as a (nope [B, L, N, Hn], rope [B, L, N or 1, Hr]) pair."""
  if isinstance(x, (tuple, list)):
    return tuple(x)
  return x, x[..., :0]


def native_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids_BT, scale: float,
                     causal: bool = True) -> jax.Array:
  """Same contract as `flash_attention.reference_attention`, on the fused CPU kernel.

  Queries and keys may each come as a (nope, rope) pair, the parts concatenated along the head
  without being materialised: MLA's decoupled RoPE, whose rotary key [B, S, 1, Hr] is shared by
  every head (`kernels.attention.join_heads` gives the equivalent single arrays). Segment ids
  [B, max(T, S)]: queries use the first T, keys the first S (None: one segment). Raises
  RuntimeError (with the build's reason) where the kernel is unavailable.
  """
  if not available():
    raise RuntimeError(f"attention impl 'native' is unavailable: {unavailable_reason()}")
  q_nope, q_rope = _split_heads(q_BTNH)
  k_nope, k_rope = _split_heads(k_BSNH)
  b, t = q_nope.shape[:2]
  s = k_nope.shape[1]
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((b, max(t, s)), jnp.int32)
  return _native(q_nope, q_rope, k_nope, k_rope, v_BSNV, segment_ids_BT, float(scale),
                 bool(causal))
