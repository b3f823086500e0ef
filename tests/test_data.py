"""Built-in corpus, tokenizers and the grain pipeline."""

import dataclasses
import json
import os

import numpy as np
import pytest

from train import corpus
from train.data import DataConfig, make_dataset, split_indices
from train.tokenizer import SentencePieceTokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def tok():
  docs = corpus.BuiltinCorpus(0, 400)
  return train_sentencepiece((docs[i] for i in range(len(docs))), 384)


def test_corpus_is_deterministic_and_correct():
  assert corpus.document(3, 17) == corpus.document(3, 17) != corpus.document(4, 17)
  import random
  r = random.Random(0)
  for _ in range(50):
    fact = corpus.arithmetic_fact(r)
    lhs, rhs = fact.rstrip(".").split(" = ")
    assert eval(lhs) == int(rhs)
    line = corpus.countdown(r)
    expression, target = line.split(": ", 1)[1].rstrip(".").split(" = ")
    assert eval(expression) == int(target)
    calc = corpus.worked_calculation(r)
    question = calc.split(". Step")[0][len("Compute "):]
    assert eval(question) == int(calc.rsplit("Answer: ", 1)[1].rstrip("."))
    program = corpus.python_function(r)
    exec(program, {})  # The asserts in it must hold.


def test_sentencepiece_round_trip_and_reload(tok, tmp_path):
  text = corpus.document(0, 3)
  assert tok.decode(tok.encode(text)) == text
  path = tmp_path / "sp.model"
  path.write_bytes(tok.model_proto)
  again = SentencePieceTokenizer(str(path))
  assert again.encode(text) == tok.encode(text) and again.vocab_size == 384


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers
  from train.tokenizer import HFTokenizer
  vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "1": 3, "+": 4, "=": 5, "2": 6}
  hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.save(str(tmp_path / "tokenizer.json"))
  t = HFTokenizer(str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
  assert t.encode("1 + 1 = 2") == [3, 4, 3, 5, 6] and (t.bos_id, t.eos_id) == (0, 1)


def test_packed_batches(tok):
  cfg = DataConfig(seq_len=48, batch_size=4, builtin_docs=400)
  batch = next(iter(make_dataset(cfg, tok)))
  assert all(v.shape == (4, 48) for v in batch.values())
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
  starts = np.diff(seg, axis=1) != 0
  assert starts.any(), "rows should pack several documents"
  assert np.all(pos[:, 1:][starts] == 0)  # Positions restart with each document.
  # A position predicting the first token of the next document carries no loss.
  np.testing.assert_array_equal(mask[:, :-1][starts], 0)
  # Each document starts with BOS.
  assert np.all(batch["inputs"][:, 1:][starts] == tok.bos_id)


def test_resume_from_iterator_state(tok):
  cfg = DataConfig(seq_len=32, batch_size=2, builtin_docs=400)
  it = iter(make_dataset(cfg, tok))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(make_dataset(cfg, tok))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_splits_and_process_slices_are_disjoint(tok):
  cfg = DataConfig(builtin_docs=1000, eval_fraction=0.1)
  train, held = set(split_indices(1000, cfg, "train")), set(split_indices(1000, cfg, "eval"))
  assert not train & held and len(train | held) == 1000 and 50 < len(held) < 150
  sliced = DataConfig(builtin_docs=1000, batch_size=4, seq_len=16)
  a = next(iter(make_dataset(sliced, tok, process_index=0, process_count=2)))
  b = next(iter(make_dataset(sliced, tok, process_index=1, process_count=2)))
  assert a["inputs"].shape == (2, 16) and not np.array_equal(a["inputs"], b["inputs"])


def test_jsonl_source_reads_each_document_from_disk_by_offset(tmp_path):
  """Documents come back exactly, in file order, across files, blank lines, CRLF endings and
  multi-byte UTF-8 (offsets are bytes); the source keeps offsets, not the documents."""
  from train.data import JsonlFiles
  first = ['{"body": "héllo ∑ 1"}', "", '{"body": "two", "other": 1}\r', '{"body": "ünï 3"}']
  second = ['  ', '{"body": "🙂 four"}', '{"body": "five\\nlines"}']
  (tmp_path / "a.jsonl").write_bytes("\n".join(first).encode() + b"\n")
  (tmp_path / "b.jsonl").write_bytes("\n".join(second).encode())  # No final newline.
  source = JsonlFiles([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], "body")
  assert [source[i] for i in range(len(source))] == [
      "héllo ∑ 1", "two", "ünï 3", "🙂 four", "five\nlines"]
  assert source[3] == "🙂 four" and source[0] == "héllo ∑ 1"  # Random access, any order.
  assert sorted(vars(source)) == ["field", "file_ids", "files", "offsets"]  # No documents held.
  assert source.offsets.dtype == np.int64 and len(source.files) == 2


def test_jsonl_and_text_sources(tok, tmp_path):
  (tmp_path / "a.jsonl").write_text(json.dumps({"body": "1 + 2 = 3."}) + "\n" +
                                    json.dumps({"body": "2 * 3 = 6."}) + "\n")
  cfg = DataConfig(source="jsonl", paths=str(tmp_path / "*.jsonl"), jsonl_field="body", seq_len=8,
                   batch_size=1, eval_fraction=0.0)
  row = next(iter(make_dataset(cfg, tok)))
  assert row["inputs"][0, 0] == tok.bos_id
  decoded = tok.decode(row["inputs"][0, 1:])  # seq_len 8 cuts the document short.
  assert "1 + 2 = 3.".startswith(decoded) or "2 * 3 = 6.".startswith(decoded)
  (tmp_path / "b.txt").write_text("7 + 1 = 8.")
  text = DataConfig(source="text", paths=str(tmp_path / "*.txt"), seq_len=4, batch_size=1,
                    eval_fraction=0.0)
  first = next(iter(make_dataset(text, tok)))
  assert "7 + 1 = 8.".startswith(tok.decode(first["inputs"][0, 1:]))
  (tmp_path / "bad.jsonl").write_text('{"body": "ok"}\n{"body": 3}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'body' is missing or not a string"):
    make_dataset(DataConfig(source="jsonl", paths=str(tmp_path / "bad.jsonl"), jsonl_field="body"),
                 tok)


def test_parquet_source_memory_maps_a_copy_of_each_column(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from train.data import ParquetFiles
  docs = [f"doc {i}: " + "x" * (i % 7) + "é" for i in range(250)]
  # Two files, one in row groups of 40 rows, with another column beside the documents.
  pq.write_table(pa.table({"id": list(range(100)), "text": docs[:100]}),
                 str(tmp_path / "a.parquet"), row_group_size=40)
  pq.write_table(pa.table({"text": docs[100:]}), str(tmp_path / "b.parquet"))
  files, cache = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tmp_path / "c")
  before = pa.total_allocated_bytes()
  source = ParquetFiles(files, "text", cache)
  assert len(source) == 250 and [source[i] for i in range(250)] == docs
  assert source[137] == docs[137] and source[0] == docs[0]  # Random access.
  # The documents live in the memory-mapped copies, not in Arrow's heap or in Python lists.
  assert pa.total_allocated_bytes() - before < 1000
  assert not any(isinstance(v, list) and v and isinstance(v[0], str) for v in vars(source).values())
  copies = sorted(os.listdir(cache))
  assert len(copies) == 2 and all(c.endswith(".arrow") for c in copies)
  stamps = [os.stat(os.path.join(cache, c)).st_mtime_ns for c in copies]
  assert [ParquetFiles(files, "text", cache)[i] for i in (5, 249)] == [docs[5], docs[249]]
  assert [os.stat(os.path.join(cache, c)).st_mtime_ns for c in copies] == stamps  # Reused.
  pq.write_table(pa.table({"text": ["edited"]}), files[1])  # An edited file is copied again.
  os.utime(files[1], ns=(1, 1))
  edited = ParquetFiles(files, "text", cache)
  assert len(edited) == 101 and edited[100] == "edited" and len(os.listdir(cache)) == 3
  assert not [c for c in os.listdir(cache) if not c.endswith(".arrow")]
  with pytest.raises(IndexError):
    edited[101]
  required = pa.schema([pa.field("text", pa.string(), nullable=False)])  # A REQUIRED column.
  pq.write_table(pa.table({"text": ["r0", "r1"]}, schema=required), str(tmp_path / "r.parquet"))
  assert [ParquetFiles([str(tmp_path / "r.parquet")], "text", cache)[i] for i in (0, 1)] == [
      "r0", "r1"]
  with pytest.raises(ValueError, match="a.parquet: column 'id' holds int64, not strings"):
    ParquetFiles(files, "id", cache)
  pq.write_table(pa.table({"text": ["a", None, "c"]}), str(tmp_path / "n.parquet"))
  with pytest.raises(ValueError, match="n.parquet: row 1: column 'text' is null"):
    ParquetFiles([str(tmp_path / "n.parquet")], "text", cache)
  assert not [c for c in os.listdir(cache) if c.endswith(".tmp")]  # Nothing half-written left.


def test_parquet_and_arrayrecord_sources(tok, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python.array_record_module import ArrayRecordWriter
  from train.data import open_source
  docs = ["1 + 2 = 3.", "4 * 5 = 20.", "9 - 3 = 6."]
  pq.write_table(pa.table({"content": docs}), str(tmp_path / "d.parquet"))
  writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  for d in docs:
    writer.write(d.encode("utf-8"))
  writer.close()
  parquet = DataConfig(source="parquet", paths=str(tmp_path / "*.parquet"), jsonl_field="content",
                       cache_dir=str(tmp_path / "cache"))
  records = DataConfig(source="arrayrecord", paths=str(tmp_path / "*.array_record"))
  assert list(open_source(parquet)[i] for i in range(3)) == docs
  assert list(open_source(records)[i] for i in range(3)) == docs
  with pytest.raises(ValueError, match="d.parquet: no column 'text'"):
    open_source(dataclasses.replace(parquet, jsonl_field="text"))
  small = dataclasses.replace(records, seq_len=8, batch_size=1, eval_fraction=0.0)
  batch = next(iter(make_dataset(small, tok)))
  assert batch["inputs"][0, 0] == tok.bos_id
