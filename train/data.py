"""The grain data pipeline: source -> held-out split -> process slice -> shuffle -> tokenize ->
pack (concatenate then split, with segment ids and positions) -> batch -> model batch.

A model batch is a dict of [B, T] arrays: inputs, targets, segment_ids, positions, loss_mask. A
target that belongs to the next document (or to padding) has loss_mask 0.
"""

from __future__ import annotations

import array
import dataclasses
import glob
import hashlib
import json
import os
import tempfile
import zlib
from typing import Iterator, Sequence

import grain
import numpy as np
from absl import logging
from grain.experimental import ConcatThenSplitIterDataset, ThreadPrefetchIterDataset

from train.corpus import BuiltinCorpus
from train.tokenizer import Tokenizer

SOURCES = ("builtin", "text", "jsonl", "parquet", "arrayrecord")
READ_THREADS = 16  # Threads reading and tokenizing documents (grain's default).
READ_AHEAD_DOCUMENTS = 500  # Tokenized documents buffered ahead of packing.
READ_AHEAD_BATCHES = 2  # Model batches packed ahead of the training loop.


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "builtin"  # builtin, text (one document per file), jsonl, parquet, arrayrecord.
  paths: str = ""  # Glob (comma-separated globs allowed) for the file sources.
  jsonl_field: str = "text"  # The JSONL field or Parquet column holding the document.
  # Parquet: where each file's column is copied once as a memory-mappable Arrow file.
  cache_dir: str = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "deepjax", "arrow")
  builtin_docs: int = 20000  # Size of the built-in corpus.
  seq_len: int = 128
  batch_size: int = 8  # Global batch; each process gets batch_size / process_count rows.
  seed: int = 0  # Corpus, split and shuffle seed.
  eval_fraction: float = 0.02  # Documents held out for evaluation (disjoint from training).
  add_bos: bool = True
  add_eos: bool = True

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"DataConfig.source must be one of {SOURCES}, got {self.source!r}")
    if self.source != "builtin" and not self.paths:
      raise ValueError(f"DataConfig.paths must name files for source {self.source!r}")
    if not 0 <= self.eval_fraction < 1:
      raise ValueError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")


class TextFiles:
  """One document per file."""

  def __init__(self, files: Sequence[str]):
    self.files = list(files)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i: int) -> str:
    with open(self.files[i], encoding="utf-8") as f:
      return f.read()


def scan_jsonl(path: str, required: tuple[str, ...] = ()) -> Iterator[tuple[int, int, dict]]:
  """(line number, byte offset of the line, record) per non-blank line; ValueError naming
  path:line for a malformed line, a non-object or a missing (or non-string) required field, and
  for a file with no records."""
  found = False
  with open(path, "rb") as f:
    offset = 0
    for number, raw in enumerate(f, 1):
      start, offset = offset, offset + len(raw)
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{number}: not UTF-8 (byte {e.start + 1} of the line)") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
      for name in required:
        if not isinstance(record.get(name), str):
          raise ValueError(f"{path}:{number}: field {name!r} is missing or not a string "
                           f"(fields: {sorted(record)})")
      found = True
      yield number, start, record
  if not found:
    raise ValueError(f"{path}: no records")


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
  """(line number, record) per non-blank line of a small file (fine-tuning data, prompts), with
  scan_jsonl's checks."""
  return [(number, record) for number, _, record in scan_jsonl(path, required)]


class JsonlFiles:
  """One document per line: the string in `field` of each JSON object. Opening checks every line
  (scan_jsonl) but keeps only where each record starts (file and byte offset, 12 bytes a
  document); a document is read from disk when it is asked for, so no process holds the corpus
  in memory."""

  def __init__(self, files: Sequence[str], field: str):
    self.files, self.field = list(files), field
    file_ids, offsets = array.array("i"), array.array("q")
    for k, path in enumerate(self.files):
      for _, offset, _ in scan_jsonl(path, (field,)):
        file_ids.append(k)
        offsets.append(offset)
    self.file_ids, self.offsets = np.frombuffer(file_ids, np.int32), np.frombuffer(offsets, np.int64)

  def __len__(self):
    return len(self.offsets)

  def __getitem__(self, i: int) -> str:
    with open(self.files[self.file_ids[i]], "rb") as f:
      f.seek(int(self.offsets[i]))
      return json.loads(f.readline())[self.field]


class ParquetFiles:
  """One document per row: the string column `column` of every file. Opening converts each file's
  column once into an uncompressed Arrow file in `cache_dir` (batch by batch, never the whole
  file in memory) and memory-maps it: a document is read through the page cache, which the
  processes of a host share, when it is asked for, and no process holds the corpus. A copy is
  keyed by the file's path, size and modification time and the column: an edited file is
  converted again. Global shuffling stays random access (a Parquet row group would have to be
  decoded for every document)."""

  def __init__(self, files: Sequence[str], column: str, cache_dir: str):
    import pyarrow as pa
    self.chunks, starts = [], [0]
    for path in files:
      copy = arrow_copy(path, column, cache_dir)
      table = pa.ipc.open_file(pa.memory_map(copy)).read_all()  # Zero-copy over the mapping.
      for chunk in table.column(0).chunks:
        self.chunks.append(chunk)
        starts.append(starts[-1] + len(chunk))
    self.starts = np.asarray(starts, np.int64)

  def __len__(self):
    return int(self.starts[-1])

  def __getitem__(self, i: int) -> str:
    if not 0 <= i < len(self):
      raise IndexError(f"document {i} of {len(self)}")
    c = int(np.searchsorted(self.starts, i, side="right")) - 1
    return self.chunks[c][i - int(self.starts[c])].as_py()


def arrow_copy(path: str, column: str, cache_dir: str) -> str:
  """The memory-mappable Arrow file holding Parquet file `path`'s string column `column`,
  written into `cache_dir` when it is not there yet (atomically: concurrent writers, processes or
  hosts sharing the directory, each write their own temporary file, synced before it is renamed
  into place). ValueError naming the file for a missing or non-string column and the row of a
  null."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  info = os.stat(path)
  key = hashlib.sha256(f"{os.path.realpath(path)}\0{info.st_size}\0{info.st_mtime_ns}\0{column}"
                       .encode()).hexdigest()[:32]
  out = os.path.join(os.path.expanduser(cache_dir), f"{key}.arrow")
  if os.path.exists(out):
    return out
  parquet = pq.ParquetFile(path)
  schema = parquet.schema_arrow
  if column not in schema.names:
    raise ValueError(f"{path}: no column {column!r} (columns: {schema.names})")
  field = schema.field(column)  # The file's own field: a REQUIRED column stays non-nullable.
  if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
    raise ValueError(f"{path}: column {column!r} holds {field.type}, not strings")
  logging.info("data: copying column %r of %s into %s (memory-mapped from now on)", column, path,
               out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  handle, tmp = tempfile.mkstemp(prefix=f"{key}.", suffix=".tmp", dir=os.path.dirname(out))
  os.close(handle)
  try:
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, pa.schema([field])) as w:
      row = 0
      for batch in parquet.iter_batches(columns=[column]):
        values = batch.column(0)
        if values.null_count:
          first = row + int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
          raise ValueError(f"{path}: row {first}: column {column!r} is null")
        w.write_batch(batch)
        row += len(batch)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


class ArrayRecordFiles:
  """One document per record (UTF-8 bytes), read at random through grain's ArrayRecord source."""

  def __init__(self, files: Sequence[str]):
    self.source = grain.sources.ArrayRecordDataSource(list(files))

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i: int) -> str:
    return self.source[i].decode("utf-8")


def _files(paths: str) -> list[str]:
  files = sorted({f for pattern in paths.split(",") for f in glob.glob(pattern.strip())})
  if not files:
    raise FileNotFoundError(f"DataConfig.paths {paths!r} matches no files")
  return files


def open_source(cfg: DataConfig):
  """The configured documents as a random-access sequence of strings."""
  if cfg.source == "builtin":
    return BuiltinCorpus(cfg.seed, cfg.builtin_docs)
  files = _files(cfg.paths)
  if cfg.source == "text":
    return TextFiles(files)
  if cfg.source == "parquet":
    return ParquetFiles(files, cfg.jsonl_field, cfg.cache_dir)
  if cfg.source == "arrayrecord":
    return ArrayRecordFiles(files)
  return JsonlFiles(files, cfg.jsonl_field)


def split_indices(num_docs: int, cfg: DataConfig, split: str) -> np.ndarray:
  """Document indices of `split` ("train" or "eval"), fixed by a hash of (seed, index)."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  held_out = np.array([zlib.crc32(f"{cfg.seed}:{i}".encode()) % 10_000 < cfg.eval_fraction * 10_000
                       for i in range(num_docs)], bool)
  return np.flatnonzero(held_out if split == "eval" else ~held_out)


def to_model_batch(packed: dict) -> dict:
  """[B, T+1] packed tokens -> [B, T] inputs/targets with segments, positions and loss mask."""
  tokens, segments = packed["tokens"], packed["tokens_segment_ids"]
  return dict(
      inputs=tokens[:, :-1].astype(np.int32), targets=tokens[:, 1:].astype(np.int32),
      segment_ids=segments[:, :-1].astype(np.int32),
      positions=packed["tokens_positions"][:, :-1].astype(np.int32),
      loss_mask=((segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)).astype(np.float32))


def make_dataset(cfg: DataConfig, tokenizer: Tokenizer, split: str = "train",
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Model batches for this process. Training repeats and reshuffles every epoch; eval runs once."""
  if cfg.batch_size % process_count:
    raise ValueError(f"DataConfig.batch_size ({cfg.batch_size}) must divide by the "
                     f"{process_count} processes")
  source = open_source(cfg)
  indices = split_indices(len(source), cfg, split)[process_index::process_count]
  if len(indices) == 0:
    raise ValueError(f"the {split} split of this process is empty: use more documents or change "
                     "DataConfig.eval_fraction")
  ds = grain.MapDataset.source(indices).map(lambda i: source[int(i)])
  if split == "train":
    ds = ds.shuffle(seed=cfg.seed).repeat(None)
  bos = [tokenizer.bos_id] if cfg.add_bos else []
  eos = [tokenizer.eos_id] if cfg.add_eos else []
  ds = ds.map(lambda text: {"tokens": np.asarray(bos + tokenizer.encode(text) + eos, np.int32)})
  # Reading and tokenizing run in grain's reader threads, ahead of use; packing and batching in
  # one more thread, so the training loop's thread only takes finished batches.
  documents = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                   prefetch_buffer_size=READ_AHEAD_DOCUMENTS))
  packed = ConcatThenSplitIterDataset(documents, length_struct={"tokens": cfg.seq_len + 1})
  batched = packed.batch(cfg.batch_size // process_count, drop_remainder=split == "train")
  return ThreadPrefetchIterDataset(batched.map(to_model_batch),
                                   prefetch_buffer_size=READ_AHEAD_BATCHES)
