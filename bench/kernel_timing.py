"""Kernel timings: flash attention and the grouped matmul against their XLA references.

Prints one JSON object per (kernel, shape, impl, pass): milliseconds per call, achieved TFLOP/s
and the XLA reference's time over this one's (`speedup_vs_xla`, > 1 is faster). On TPU/GPU the
shapes are MLA attention (qk head 192, value head 128) and DeepSeek-style expert matmuls, for the
Pallas kernels; on CPU the benchmark models' attention and routed-expert shapes, for the native
C++ kernels (and the chunked attention). (The Pallas kernels' interpreted CPU runs are tests.)

  .venv/bin/python bench/kernel_timing.py          # all kernels, the shapes for this backend
  .venv/bin/python bench/kernel_timing.py --kernels=gmm --iters=20

(Not `bench/kernels.py`: run as a script, that name would shadow the `kernels` package.)
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kernels.attention import attention
from kernels.backend import on_accelerator
from kernels.grouped_matmul import grouped_matmul

_KERNELS = flags.DEFINE_list("kernels", ["attention", "gmm"], "Kernels to time.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per measurement (after one warm-up).")
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd, and/or forward + backward.")

ACCELERATOR = on_accelerator()

# (B, T, N, H, V): MLA head sizes on accelerators; bench-tiny's and bench-medium's on CPU.
ATTENTION_SHAPES = ([(1, 8192, 16, 192, 128), (2, 4096, 32, 192, 128), (4, 2048, 128, 192, 128)]
                    if ACCELERATOR else [(8, 256, 4, 48, 32), (8, 256, 8, 96, 64)])
# (M rows, K, N, G groups): DeepSeek-V3 expert gate/up and down projections over 8192 rows, many
# or few groups, and over the 8192 x top-8 = 65536 routed rows of 8192 tokens. On CPU the routed
# experts of bench-small (2048 rows of 1024 tokens x top-2) and bench-medium (gate/up, down).
GMM_SHAPES = ([(8192, 7168, 2048, 256), (8192, 2048, 7168, 256), (8192, 2048, 2048, 8),
               (65536, 7168, 2048, 256)] if ACCELERATOR else
              [(2048, 256, 256, 8), (4096, 512, 256, 8), (4096, 256, 512, 8)])


def _time_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(_ITERS.value):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / _ITERS.value * 1e3


def _passes(fn, args, cotangent):
  """{pass: jitted callable}: the forward alone, and forward + vjp with a fixed cotangent."""
  def fwd_bwd(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(cotangent)
  table = {"fwd": jax.jit(fn), "fwd_bwd": jax.jit(fwd_bwd)}
  return {name: table[name] for name in _PASSES.value}


def _report(kernel, shape, impls, make, flops_fwd):
  """Times each impl ("xla" first: the baseline); the backward counts 2.5x (attention) or 2x (gmm)
  the forward FLOPs."""
  backward_factor = {"attention": 2.5, "gmm": 2.0}[kernel]
  xla_ms = {}
  for impl in impls:
    fn, args, cotangent = make(impl)
    for name, call in _passes(fn, args, cotangent).items():
      ms = _time_ms(call, *args)
      if impl == "xla":
        xla_ms[name] = ms
      flops = flops_fwd * (1 if name == "fwd" else 1 + backward_factor)
      print(json.dumps({
          "kernel": kernel, "shape": shape, "impl": impl, "pass": name, "ms": ms,
          "tflops_per_sec": flops / ms / 1e9, "speedup_vs_xla": xla_ms[name] / ms,
          "interpreted": impl == "pallas" and not ACCELERATOR, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind}), flush=True)


def bench_attention(dtype):
  impls = (["xla", "pallas"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
           if ACCELERATOR else ["xla", "chunked", "native"])
  for b, t, n, h, v in ATTENTION_SHAPES:
    ks = jax.random.split(jax.random.key(0), 4)
    q, k = (jax.random.normal(key, (b, t, n, h), dtype) for key in ks[:2])
    vv = jax.random.normal(ks[2], (b, t, n, v), dtype)
    cotangent = jax.random.normal(ks[3], (b, t, n, v), dtype)
    segments = jnp.ones((b, t), jnp.int32).at[:, t // 2:].set(2)  # Two documents per row.

    def make(impl):
      fn = lambda q, k, v: attention(q, k, v, segments, h**-0.5, causal=True, impl=impl)
      return fn, (q, k, vv), cotangent

    flops = 2 * b * n * t * t * (h + v) / 2  # Causal: half the score matrix.
    _report("attention", dict(B=b, T=t, N=n, H=h, V=v, dtype=dtype.name), impls, make, flops)


def bench_gmm(dtype):
  impls = ["xla", "pallas"] if ACCELERATOR else ["xla", "native"]  # CPU "xla": blocked.
  for m, k, n, g in GMM_SHAPES:
    rng = np.random.default_rng(0)
    sizes = jnp.asarray(rng.multinomial(m, rng.dirichlet(np.ones(g))), jnp.int32)  # Some empty.
    ks = jax.random.split(jax.random.key(1), 3)
    lhs = jax.random.normal(ks[0], (m, k), dtype)
    rhs = jax.random.normal(ks[1], (g, k, n), dtype) * k**-0.5
    cotangent = jax.random.normal(ks[2], (m, n), dtype)

    def make(impl):
      return (lambda l, r: grouped_matmul(l, r, sizes, impl=impl)), (lhs, rhs), cotangent

    shape = dict(M=m, K=k, N=n, G=g, empty_groups=int((sizes == 0).sum()), dtype=dtype.name)
    _report("gmm", shape, impls, make, 2 * m * k * n)


def main(argv):
  del argv
  dtype = jnp.dtype(jnp.bfloat16 if ACCELERATOR else jnp.float32)
  benches = {"attention": bench_attention, "gmm": bench_gmm}
  for name in _KERNELS.value:
    if name not in benches:
      raise ValueError(f"--kernels: unknown kernel {name!r}; known: {sorted(benches)}")
    benches[name](dtype)


if __name__ == "__main__":
  app.run(main)
