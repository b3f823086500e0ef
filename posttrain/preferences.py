"""Preference data: pairs of responses to one prompt, the preferred one first, for the reward model
and the DPO family.

Records are JSONL, in TRL's forms: {"prompt", "chosen", "rejected"} where each is a string or a
message list (explicit prompt), or {"chosen", "rejected"} as whole conversations that share their
prompt (implicit prompt: the common leading messages). Optional fields: "label", the probability
that "chosen" is preferred (soft labels from AI feedback; 1 by default), and "margin", a per-pair
Bradley-Terry margin.

Built-in pairs come from the task suite (`task_preferences`): the worked reference solution against
a wrong, malformed or rambling variant of it, with the verifier and the format rule deciding which
is which. Batches hold one pair per row, right-padded (`PairBatches`, resumable like SFT's).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from posttrain.chat import assistant_content, encode_chat, parse_response, validate_messages
from posttrain.data import TRUNCATION, EpochBatches
from posttrain.tasks import get_task, task_names
from train.data import read_jsonl

REJECTED_KINDS = ("wrong", "malformed", "rambling", "unexplained")
UNEXPLAINED = "I know this one."  # The whole reasoning of an "unexplained" variant.


@dataclasses.dataclass(frozen=True)
class Preference:
  """One preference pair: the conversation so far, then two responses, `chosen` preferred with
  probability `label`."""

  prompt: list  # Messages before the responses (ends with a user turn).
  chosen: list  # The preferred response's messages (assistant turns).
  rejected: list
  label: float = 1.0
  margin: float = 0.0
  kind: str = ""  # How a built-in pair was made (REJECTED_KINDS); "" for read pairs.

  def to_record(self) -> dict:
    """The JSONL record of this pair (explicit-prompt, conversational form)."""
    record = dict(prompt=self.prompt, chosen=self.chosen, rejected=self.rejected)
    if self.label != 1.0:
      record["label"] = self.label
    if self.margin:
      record["margin"] = self.margin
    return record


def _messages(value, role: str, where: str, name: str) -> list:
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, list):
    return value
  raise ValueError(f"{where}: field {name!r} must be a string or a message list, "
                   f"got {type(value).__name__}")


def record_preference(record: dict, where: str) -> Preference:
  """A Preference from a JSONL record (see the module doc); ValueError naming `where` and the
  field at fault."""
  for name in ("chosen", "rejected"):
    if name not in record:
      raise ValueError(f"{where}: a preference record needs 'chosen' and 'rejected' "
                       f"(fields: {sorted(record)})")
  chosen = _messages(record["chosen"], "assistant", where, "chosen")
  rejected = _messages(record["rejected"], "assistant", where, "rejected")
  if "prompt" in record:
    prompt = _messages(record["prompt"], "user", where, "prompt")
  else:  # Implicit prompt: the messages both conversations start with.
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
      n += 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
      raise ValueError(f"{where}: no 'prompt' field, and 'chosen' and 'rejected' share no leading "
                       "messages to take it from")
  for name, messages in (("chosen", chosen), ("rejected", rejected)):
    validate_messages(prompt + messages, f"{where}: field {name!r}")
    if not messages or any(m["role"] != "assistant" for m in messages):
      raise ValueError(f"{where}: field {name!r} must be assistant turns after the prompt")
  label, margin = record.get("label", 1.0), record.get("margin", 0.0)
  if not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
    raise ValueError(f"{where}: field 'label' must be a probability in [0, 1], got {label!r}")
  if not isinstance(margin, (int, float)):
    raise ValueError(f"{where}: field 'margin' must be a number, got {margin!r}")
  return Preference(prompt, chosen, rejected, float(label), float(margin))


def read_preferences(path: str) -> list[Preference]:
  """Every preference pair of a JSONL file."""
  return [record_preference(r, f"{path}:{n}") for n, r in read_jsonl(path)]


def write_preferences(path: str, pairs: Sequence[Preference]) -> None:
  """Writes pairs as JSONL records that `read_preferences` reads back (all at once: a killed
  labelling run leaves no half file)."""
  from train.checkpoint import write_atomically
  write_atomically(path, "".join(json.dumps(p.to_record()) + "\n" for p in pairs))


# --- built-in pairs from the task suite -----------------------------------------------------------

def _wrong_answer(answer: str, rng: np.random.Generator) -> str:
  """`answer` with one digit changed (or a digit appended when it has none)."""
  digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
  if not digits:
    return answer + str(rng.integers(10))
  i = digits[-1] if rng.random() < 0.7 else int(rng.choice(digits))
  new = str((int(answer[i]) + 1 + int(rng.integers(9))) % 10)
  return answer[:i] + new + answer[i + 1:]


def rejected_variant(task, problem, kind: str, rng: np.random.Generator) -> str | None:
  """A worse response than `problem.solution` of the given kind, checked by the rules: "wrong"
  (the verifier rejects its answer), "malformed" (no `<think>` section), "rambling" (correct but
  the reasoning said twice over), "unexplained" (well formed and correct, but the reasoning shows
  no step). None when no such variant could be made."""
  parsed = parse_response(problem.solution)
  reasoning, answer = parsed.reasoning or "", parsed.answer
  if kind == "wrong":
    for _ in range(10):
      text = assistant_content(reasoning, _wrong_answer(answer, rng))
      if not task.verify(problem, text).correct:
        return text
    return None
  if kind == "malformed":
    text = f"{reasoning} So the answer is {answer}."
    return None if parse_response(text).well_formed else text
  if kind == "rambling":
    return assistant_content(f"{reasoning} Let me say it again. {reasoning}", answer)
  if kind == "unexplained":
    return assistant_content(UNEXPLAINED, answer)
  raise ValueError(f"rejected kind must be one of {REJECTED_KINDS}, got {kind!r}")


def task_preferences(tasks: str, split: str, count: int, seed: int = 0,
                     kinds: str = "wrong,malformed,rambling") -> list[Preference]:
  """`count` pairs per comma-separated task family: the verified reference solution (correct and
  well formed) against a rejected variant of a kind drawn from `kinds`."""
  kind_names = [k.strip() for k in kinds.split(",") if k.strip()]
  unknown = sorted(set(kind_names) - set(REJECTED_KINDS))
  if unknown or not kind_names:
    raise ValueError(f"rejected kinds {unknown or kinds!r}: choose from {REJECTED_KINDS}")
  rng = np.random.default_rng([seed, 7])
  pairs = []
  for name in task_names(tasks):
    task = get_task(name)
    for problem in task.problems(split, count, seed):
      if not (task.verify(problem, problem.solution).correct
              and parse_response(problem.solution).well_formed):
        raise RuntimeError(f"{name} problem {problem.key!r}: its reference solution fails its "
                           "own verifier or the format")
      kind = kind_names[int(rng.integers(len(kind_names)))]
      text = rejected_variant(task, problem, kind, rng)
      if text is None:
        continue
      pairs.append(Preference([{"role": "user", "content": problem.prompt}],
                              [{"role": "assistant", "content": problem.solution}],
                              [{"role": "assistant", "content": text}], kind=kind))
  if not pairs:
    raise ValueError(f"no preference pairs from tasks {tasks!r}")
  return pairs


# --- encoded pairs and batches ---------------------------------------------------------------------

@dataclasses.dataclass
class EncodedPairs:
  """Token ids and response masks of both sides of every kept pair."""

  chosen: list  # [(tokens, mask)] per pair; the mask is 1 on response tokens.
  rejected: list
  labels: np.ndarray  # [N] float32.
  margins: np.ndarray  # [N] float32.
  truncated: int
  dropped: int


def _encode_side(tokenizer, prompt: list, response: list):
  tokens, mask = encode_chat(tokenizer, prompt + response)
  skip = len(encode_chat(tokenizer, prompt)[0]) if prompt else 1
  mask = [0] * skip + list(mask[skip:])  # Only the response's own turns count.
  return np.asarray(tokens, np.int32), np.asarray(mask, np.float32)


def encode_pairs(tokenizer, pairs: Sequence[Preference], max_len: int,
                 truncation: str = "truncate") -> EncodedPairs:
  """Encodes both sides of every pair; a side longer than `max_len` tokens is cut to its first
  `max_len` ("truncate", both sides kept) or the pair left out ("drop"); either way counted."""
  if truncation not in TRUNCATION:
    raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
  chosen, rejected, labels, margins, truncated, dropped = [], [], [], [], 0, 0
  for p in pairs:
    c, r = _encode_side(tokenizer, p.prompt, p.chosen), _encode_side(tokenizer, p.prompt, p.rejected)
    if max(len(c[0]), len(r[0])) > max_len:
      if truncation == "drop":
        dropped += 1
        continue
      truncated += 1
      c, r = (c[0][:max_len], c[1][:max_len]), (r[0][:max_len], r[1][:max_len])
    if not (c[1].any() and r[1].any()):
      dropped += 1  # The prompt alone fills max_len: no response token left to compare.
      continue
    chosen.append(c)
    rejected.append(r)
    labels.append(p.label)
    margins.append(p.margin)
  if not chosen:
    raise ValueError(f"no preference pairs left: all {dropped} have a side longer than {max_len} "
                     "tokens (or no response token within it)")
  return EncodedPairs(chosen, rejected, np.asarray(labels, np.float32),
                      np.asarray(margins, np.float32), truncated, dropped)


def pair_batch(pairs: EncodedPairs, rows: Sequence[int], width: int, extra: dict | None = None):
  """Arrays for pairs `rows`: chosen/rejected tokens and masks [B, width] (right-padded with 0),
  the index of each side's last real token [B], label and margin [B], and per-pair `extra`
  arrays (cached reference log-probs) indexed by row."""
  b = len(rows)
  out = dict(label=pairs.labels[rows], margin=pairs.margins[rows])
  for side in ("chosen", "rejected"):
    tokens = np.zeros((b, width), np.int32)
    mask = np.zeros((b, width), np.float32)
    last = np.zeros((b,), np.int32)
    for j, i in enumerate(rows):
      t, m = getattr(pairs, side)[i]
      tokens[j, :len(t)], mask[j, :len(t)], last[j] = t, m, len(t) - 1
    out[side], out[f"{side}_mask"], out[f"{side}_last"] = tokens, mask, last
  for k, v in (extra or {}).items():
    out[k] = np.asarray(v)[rows]
  return out


class PairBatches(EpochBatches):
  """Resumable, per-epoch shuffled batches of one preference pair per row (`pair_batch`)."""

  def __init__(self, pairs: EncodedPairs, width: int, batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, shuffle: bool = True,
               extra: dict | None = None):
    super().__init__(batch_size, seed, process_index, process_count, shuffle)
    self.pairs, self.width, self.extra = pairs, width, extra
    if len(pairs.chosen) < batch_size:
      raise ValueError(f"{len(pairs.chosen)} preference pairs are fewer than one batch of "
                       f"{batch_size}: add pairs or lower batch_size")

  def items(self) -> int:
    return len(self.pairs.chosen)

  def make_rows(self, order):
    return [int(i) for i in order]

  def build(self, rows):
    return pair_batch(self.pairs, list(rows), self.width, self.extra)


def configured_pairs(d, split: str) -> list[Preference]:
  """The train or held-out pairs of a stage's `config.data` (builtin task pairs or JSONL files);
  empty when there are no held-out ones."""
  if d.source == "builtin":
    count = d.builtin_pairs if split == "train" else d.eval_pairs
    if not count:
      return []
    return task_preferences(d.tasks, "train" if split == "train" else "test", count, d.seed,
                            d.rejected_kinds)
  if d.source != "jsonl":
    raise ValueError(f"config.data.source must be 'builtin' or 'jsonl', got {d.source!r}")
  paths = d.paths if split == "train" else d.eval_paths
  if split == "train" and not paths:
    raise ValueError("config.data.source='jsonl' needs config.data.paths")
  return [p for path in paths.split(",") if path.strip() for p in read_preferences(path.strip())]


def pair_data(d, tokenizer, split: str, shard=(0, 1), extra: dict | None = None):
  """PairBatches of the configured train (shuffled) or held-out (in order) pairs; None when
  there are no held-out pairs (no training pairs: a ValueError). Prints the truncation counts of
  the train split."""
  pairs = configured_pairs(d, split)
  if not pairs and split == "train":
    raise ValueError(f"config.data: no training pairs (source {d.source!r}, builtin_pairs "
                     f"{d.builtin_pairs}, paths {d.paths!r})")
  if not pairs:
    return None
  encoded = encode_pairs(tokenizer, pairs, d.seq_len, d.truncation)
  if split == "train":
    print(f"pairs: {len(encoded.chosen)} ({encoded.truncated} truncated, {encoded.dropped} "
          f"dropped: a side longer than {d.seq_len} tokens)", flush=True)
  return PairBatches(encoded, d.seq_len, d.batch_size, d.seed, *shard,
                     shuffle=split == "train", extra=extra)
