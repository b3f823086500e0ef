"""Post-training data: JSONL records with errors that name file and line, chat examples, and
packed, shuffled, resumable batches of (tokens, loss mask) examples.

Packing: each epoch shuffles the examples (seeded by (seed, epoch)) and fills rows of
`seq_len + 1` tokens one example after another; an example that does not fit in the current row
starts the next one, so no example is ever cut across rows. An example longer than a whole row is
handled by the truncation policy: "truncate" keeps its first `seq_len + 1` tokens (the prompt and
the start of the response), "drop" leaves it out; either way it is counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posttrain.chat import validate_messages
from train.data import read_jsonl

TRUNCATION = ("truncate", "drop")


def bucket_width(lengths, limit: int, multiple: int = 32) -> int:
  """The padded width of rows of these lengths: the longest rounded up to a multiple of
  `multiple`, so calls of similar lengths share one compiled shape, but not past `limit` (nor
  below the longest)."""
  longest = max(lengths)
  return max(longest, min(limit, -(-longest // multiple) * multiple))


def record_messages(record: dict, where: str) -> list[dict]:
  """A chat example from a record: {"messages": [...]} or {"prompt", "completion"} (strings, or
  message lists as in TRL's conversational form). ValueError naming `where` and the field."""
  if "messages" in record:
    messages = record["messages"]
  elif "prompt" in record and "completion" in record:
    prompt, completion = record["prompt"], record["completion"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    completion = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                  else completion)
    if not isinstance(prompt, list) or not isinstance(completion, list):
      raise ValueError(f"{where}: fields 'prompt' and 'completion' must be strings or message lists")
    messages = prompt + completion
  else:
    raise ValueError(f"{where}: a record needs 'messages' or 'prompt' and 'completion' "
                     f"(fields: {sorted(record)})")
  validate_messages(messages, where)
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: no assistant message, so nothing to learn")
  return list(messages)


def read_chat_jsonl(path: str) -> list[list[dict]]:
  """Every chat example of a JSONL file (see `record_messages`)."""
  return [record_messages(r, f"{path}:{n}") for n, r in read_jsonl(path)]


@dataclasses.dataclass
class Examples:
  """Encoded examples ready to pack, after the truncation policy."""

  tokens: list[np.ndarray]
  masks: list[np.ndarray]
  truncated: int  # Examples longer than a row that were cut to one row.
  dropped: int  # Examples longer than a row that were left out (or left with no trained token).


def prepare(encoded, row_len: int, truncation: str = "truncate") -> Examples:
  """Applies the truncation policy to [(tokens, mask)] for rows of `row_len` tokens: "truncate"
  keeps the head (and drops an example whose head has no trained token: its prompt fills the
  row), "drop" leaves out every example longer than a row; both are counted."""
  if truncation not in TRUNCATION:
    raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
  tokens, masks, truncated, dropped = [], [], 0, 0
  for t, m in encoded:
    if len(t) > row_len:
      if truncation == "drop" or not np.any(np.asarray(m[:row_len])):
        dropped += 1
        continue
      t, m = t[:row_len], m[:row_len]
      truncated += 1
    tokens.append(np.asarray(t, np.int32))
    masks.append(np.asarray(m, np.float32))
  if not tokens:
    raise ValueError(f"no examples left: all {dropped} are longer than {row_len} tokens (with "
                     f"truncation={truncation!r}); raise the sequence length")
  return Examples(tokens, masks, truncated, dropped)


def pack_rows(lengths, order, row_len: int) -> list[list[int]]:
  """Example indices per row: `order` filled greedily into rows of `row_len` tokens, an example
  that does not fit starting a new row (every length must be <= row_len)."""
  rows, current, used = [], [], 0
  for i in order:
    n = lengths[i]
    if current and used + n > row_len:
      rows.append(current)
      current, used = [], 0
    current.append(int(i))
    used += n
  if current:
    rows.append(current)
  return rows


def packed_batch(examples: Examples, rows: list[list[int]], seq_len: int) -> dict:
  """Model inputs for `rows`: inputs/targets [B, seq_len], segment ids (0 = padding), positions
  within each example, and loss_mask on targets the examples' masks select."""
  b, row_len = len(rows), seq_len + 1
  tokens = np.zeros((b, row_len), np.int32)
  masks = np.zeros((b, row_len), np.float32)
  segments = np.zeros((b, row_len), np.int32)
  positions = np.zeros((b, row_len), np.int32)
  for r, row in enumerate(rows):
    start = 0
    for s, i in enumerate(row, 1):
      n = len(examples.tokens[i])
      tokens[r, start:start + n] = examples.tokens[i]
      masks[r, start:start + n] = examples.masks[i]
      segments[r, start:start + n] = s
      positions[r, start:start + n] = np.arange(n)
      start += n
  same = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segments[:, :-1],
              positions=positions[:, :-1], loss_mask=(same * masks[:, 1:]).astype(np.float32))


class EpochBatches:
  """An endless, resumable iterator of batches of `batch_size` rows (this process gets its share),
  the rows reshuffled every epoch (seeded by (seed, epoch)); the state is (epoch, batch within the
  epoch). Subclasses say what a row is (`make_rows`) and how rows become arrays (`build`)."""

  def __init__(self, batch_size: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} must divide by the {process_count} processes")
    self.batch_size, self.seed = batch_size, seed
    self.shard, self.shuffle = (process_index, process_count), shuffle
    self.epoch, self.batch, self._rows_epoch, self._rows = 0, 0, None, None

  def make_rows(self, order: np.ndarray) -> list:
    """The rows of an epoch whose items come in `order`."""
    raise NotImplementedError

  def build(self, rows: list) -> dict:
    """The batch arrays of `rows`."""
    raise NotImplementedError

  def items(self) -> int:
    """How many items (examples, pairs) an epoch orders."""
    raise NotImplementedError

  def rows(self, epoch: int) -> list:
    """The rows of `epoch` (its shuffled order; items in file order without shuffle)."""
    if self._rows_epoch != epoch:
      n = self.items()
      order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
               else np.arange(n))
      self._rows, self._rows_epoch = self.make_rows(order), epoch
    return self._rows

  def batches_per_epoch(self) -> int:
    return len(self.rows(self.epoch)) // self.batch_size

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.batch >= self.batches_per_epoch():
      self.epoch, self.batch = self.epoch + 1, 0
    start = self.batch * self.batch_size
    rows = self.rows(self.epoch)[start:start + self.batch_size]
    self.batch += 1
    index, count = self.shard
    share = self.batch_size // count
    return self.build(rows[index * share:(index + 1) * share])

  def get_state(self) -> dict:
    return dict(epoch=self.epoch, batch=self.batch)

  def set_state(self, state: dict) -> None:
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

  def fixed(self):
    """Every full batch of one unshuffled epoch, in order (for held-out metrics)."""
    self.shuffle, self.epoch, self.batch, self._rows_epoch = False, 0, 0, None
    for _ in range(self.batches_per_epoch()):
      yield next(self)


class PackedBatches(EpochBatches):
  """Packed (tokens, loss mask) examples: rows of `seq_len + 1` tokens (see the module doc)."""

  def __init__(self, examples: Examples, seq_len: int, batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, shuffle: bool = True):
    super().__init__(batch_size, seed, process_index, process_count, shuffle)
    self.examples, self.seq_len = examples, seq_len
    self.lengths = [len(t) for t in examples.tokens]
    if len(self.rows(0)) < batch_size:
      raise ValueError(f"the data packs into {len(self.rows(0))} rows of {seq_len + 1} tokens, "
                       f"fewer than one batch of {batch_size}: add examples or lower batch_size")

  def items(self) -> int:
    return len(self.lengths)

  def make_rows(self, order):
    return pack_rows(self.lengths, order, self.seq_len + 1)

  def build(self, rows):
    return packed_batch(self.examples, rows, self.seq_len)


def fixed_batches(examples: Examples, seq_len: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1):
  """Every full batch of `examples` once, in order (for held-out losses)."""
  return PackedBatches(examples, seq_len, batch_size, 0, process_index, process_count,
                       shuffle=False).fixed()
