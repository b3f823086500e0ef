"""Packing right-padded rows into fewer, longer rows for one forward pass, and back.

A batch of B rows padded to width T (RL rollouts: prompt, completion, padding) wastes the forward
on its padding. `plan_packing` lays the rows' real tokens end to end into R rows of `row_len`
(first-fit decreasing, a row never split), each row its own segment with positions restarting at
0, so attention never crosses rows and every token sees exactly the context it had unpacked.
`pack` gathers [B, T, ...] arrays into that layout and `unpack` gathers per-token results back,
so a loss written over the padded rows runs unchanged on the packed forward.

The plan packs each contiguous chunk of B / chunks rows (the train step's micro-batches) into its
own R / chunks rows, so the indices stay local to a micro-batch. R per chunk is rounded up to a
multiple of `row_multiple` (the batch shards, so every micro-batch divides over the mesh) and of
a sixteenth of the chunk (so a run compiles a few shapes, not one per batch: on the built-in
GRPO recipe, 256 rows of 83 tokens pack into 128 or 144 rows of 128).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

KEYS = ("pack_source", "pack_positions", "pack_segments", "pack_target")


def packed_row_len(width: int, limit: int, factor: float = 1.5) -> int:
  """The packed row length for rows padded to `width`: factor x width rounded up to a multiple of
  16 (at 1.5, two rows of about two thirds of the width share one), capped at `limit` (the
  model's max_seq_len) and never below `width`."""
  return max(width, min(limit, math.ceil(factor * width / 16) * 16))


def first_fit_decreasing(lengths: Sequence[int], row_len: int) -> list[list[int]]:
  """Indices of `lengths` per packed row: longest first, each into the first row it fits."""
  rows, used = [], []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    n = int(lengths[i])
    if n > row_len:
      raise ValueError(f"row {i} has {n} tokens, more than the packed row length {row_len}")
    for r, u in enumerate(used):
      if u + n <= row_len:
        rows[r].append(i)
        used[r] += n
        break
    else:
      rows.append([i])
      used.append(n)
  return rows


def plan_packing(lengths: Sequence[int], width: int, row_len: int, chunks: int = 1,
                 row_multiple: int = 1) -> Optional[dict]:
  """The packing of B rows whose first `lengths[b]` tokens are real (rows padded to `width`)
  into rows of `row_len`, chunk by chunk; None when it would not run fewer token slots than the
  padded batch. The plan (int32 arrays, indices local to each chunk):

    pack_source   [R, row_len]  flat index b * width + t into the chunk's rows, -1 on padding
    pack_positions, pack_segments [R, row_len]  position within the row, row number from 1
                  (0 on padding)
    pack_target   [B, width]    flat index r * row_len + s of each real token, -1 elsewhere
  """
  b = len(lengths)
  if b % chunks:
    raise ValueError(f"{b} rows do not split into {chunks} chunks")
  per = b // chunks
  granule = math.lcm(max(1, row_multiple), max(1, per // 16))
  fits = [first_fit_decreasing(lengths[c * per:(c + 1) * per], row_len) for c in range(chunks)]
  r = -(-max(len(f) for f in fits) // granule) * granule
  if r * row_len >= per * width:
    return None
  source = np.full((chunks * r, row_len), -1, np.int32)
  positions = np.zeros((chunks * r, row_len), np.int32)
  segments = np.zeros((chunks * r, row_len), np.int32)
  target = np.full((b, width), -1, np.int32)
  for c, rows in enumerate(fits):
    for k, members in enumerate(rows):
      start = 0
      for s, i in enumerate(members, 1):
        n = int(lengths[c * per + i])
        slots = slice(start, start + n)
        source[c * r + k, slots] = i * width + np.arange(n)
        positions[c * r + k, slots] = np.arange(n)
        segments[c * r + k, slots] = s
        target[c * per + i, :n] = k * row_len + start + np.arange(n)
        start += n
  return dict(pack_source=source, pack_positions=positions, pack_segments=segments,
              pack_target=target)


@dataclasses.dataclass(frozen=True)
class PackLayout:
  """How a batch source packs the batches it serves: rows of up to `limit` tokens (the model's
  max_seq_len), `chunks` the train step's micro-batches, `row_multiple` the mesh's batch shards.
  Chunks of fewer than `min_rows` rows are served unpacked: each packed shape is one more
  compilation of the step, which a small batch does not win back. `factor`: packed rows are
  that many times the padded width (`packed_row_len`)."""
  limit: int
  chunks: int = 1
  row_multiple: int = 1
  min_rows: int = 16
  factor: float = 1.5

  def plan(self, lengths: Sequence[int], width: int) -> Optional[dict]:
    """`plan_packing` of rows padded to `width` under this layout (None: serve them unpacked)."""
    if len(lengths) < self.min_rows * self.chunks:
      return None
    return plan_packing(lengths, width, packed_row_len(width, self.limit, self.factor),
                        self.chunks, self.row_multiple)


def pack(x_BT, source_RW, fill=0):
  """[B, T, ...] -> [R, W, ...] under a plan's `pack_source` (`fill` on padding)."""
  flat = x_BT.reshape((-1,) + x_BT.shape[2:])
  picked = jnp.take(flat, jnp.maximum(source_RW, 0), axis=0)
  on = (source_RW >= 0).reshape(source_RW.shape + (1,) * (x_BT.ndim - 2))
  return jnp.where(on, picked, jnp.asarray(fill, x_BT.dtype))


def unpack(x_RW, target_BT):
  """Per-token [R, W] -> [B, T] under a plan's `pack_target` (0 where no token was packed)."""
  picked = jnp.take(x_RW.reshape(-1), jnp.maximum(target_BT, 0), axis=0)
  return jnp.where(target_BT >= 0, picked, jnp.zeros((), x_RW.dtype))


def batch_plan(batch: dict) -> Optional[dict]:
  """The packing plan a batch carries (its KEYS), or None when it has none."""
  return {k: batch[k] for k in KEYS} if KEYS[0] in batch else None
