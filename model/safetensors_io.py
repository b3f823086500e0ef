"""Reading and writing safetensors files with numpy: memory-mapped, tensor by tensor, FP8 included.

The reader parses the format itself (an 8-byte header length, a JSON header, raw little-endian
bytes) so that bfloat16 and float8 tensors load through `ml_dtypes` without torch.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_header(path: str) -> dict:
  """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(raw, "little")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: unreadable safetensors header: {e}") from e
  header.pop("__metadata__", None)
  return header


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, memory-mapped array) for each tensor of one file, in file order."""
  header = read_header(path)
  start = 8 + int.from_bytes(open(path, "rb").read(8), "little")
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    yield name, mm[start + lo:start + hi].view(dtype).reshape(info["shape"])


def checkpoint_files(directory: str) -> list[str]:
  """The safetensors files of a HF checkpoint directory (through its index when sharded)."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(f"{directory}: no model.safetensors, index file or *.safetensors")
  return [os.path.join(directory, n) for n in found]


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """DeepSeek's block-quantised FP8: weight * scale_inv of its [block_rows, block_cols] tile."""
  rows, cols = weight.shape
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)
  return weight.astype(np.float32) * scale[:rows, :cols]


def write_sharded(tensors: Iterator[tuple[str, np.ndarray]], directory: str,
                  max_shard_bytes: int = 4 << 30) -> None:
  """Writes tensors into model-0000i-of-0000n.safetensors shards plus the index file."""
  from safetensors.numpy import save_file

  shards, current, size = [], {}, 0
  for name, array in tensors:
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = np.ascontiguousarray(array)
    size += array.nbytes
  shards.append(current)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards, start=1):
    fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
    for name, array in shard.items():
      weight_map[name] = fname
      total += array.nbytes
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
