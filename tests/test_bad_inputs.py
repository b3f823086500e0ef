"""Bad inputs get a clear error naming the file and line, the field or the value, before anything
is written. (More of the sweep lives beside each feature: chat roles in test_chat.py, SFT records
and truncation in test_sft.py, preference records in test_preferences.py, ModelConfig rules in
test_config.py, HF tensors in test_hf.py, meshes in test_sharding.py, rewards in test_grpo.py, the
constitution in test_ai_feedback.py.)"""

import os
import shutil
import types

import numpy as np
import pytest

from configs.pretrain import get_config
from posttrain.data import prepare
from posttrain.preferences import pair_data, read_preferences
from posttrain.rewards import RewardSet, think_format
from train.data import DataConfig, open_source
from train.parallel import check_batch_layout


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def test_a_malformed_or_incomplete_jsonl_line_is_named(tmp_path):
  corpus = _write(tmp_path / "corpus.jsonl", ['{"text": "one"}', '{"text": "two"', '{"text": 3}'])
  with pytest.raises(ValueError, match=r"corpus.jsonl:2: not valid JSON"):
    open_source(DataConfig(source="jsonl", paths=corpus))
  prefs = _write(tmp_path / "prefs.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}',
                                            '{"prompt": "p", "chosen": "a", "rejected": "b"'])
  with pytest.raises(ValueError, match=r"prefs.jsonl:2: not valid JSON"):
    read_preferences(prefs)
  latin = tmp_path / "latin.jsonl"
  latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8 \(byte 14 of the line\)"):
    open_source(DataConfig(source="jsonl", paths=str(latin)))
  no_prompt = _write(tmp_path / "no_prompt.jsonl", ['{"chosen": "4", "rejected": "5"}'])
  with pytest.raises(ValueError, match=r"no_prompt.jsonl:1: no 'prompt' field, and 'chosen' and "
                                       r"'rejected' share no leading messages"):
    read_preferences(no_prompt)


def test_an_empty_dataset_is_an_error(tmp_path):
  empty = _write(tmp_path / "empty.jsonl", [])
  with pytest.raises(ValueError, match=r"empty.jsonl: no records"):
    read_preferences(empty)
  from configs.dpo import get_config as dpo_config
  d = dpo_config().data
  d.builtin_pairs = 0
  with pytest.raises(ValueError, match=r"config.data: no training pairs \(source 'builtin', "
                                       r"builtin_pairs 0"):
    pair_data(d, None, "train")


def test_truncation_drops_an_example_left_without_a_trained_token():
  prompt_fills_row = ([1] * 12, [0] * 10 + [1, 1])  # The answer starts past the row.
  kept = ([1] * 12, [0] * 2 + [1] * 10)
  out = prepare([prompt_fills_row, kept], row_len=8, truncation="truncate")
  assert (out.truncated, out.dropped, len(out.tokens)) == (1, 1, 1)
  assert out.masks[0].sum() == 6
  with pytest.raises(ValueError, match=r"no examples left: all 1 are longer than 8 tokens "
                                       r"\(with truncation='truncate'\)"):
    prepare([prompt_fills_row], row_len=8)


@pytest.fixture(scope="module")
def tokenizer_400(tmp_path_factory):
  """A SentencePiece model of 400 tokens trained on the built-in corpus: (path, its bytes)."""
  from train import corpus
  from train.tokenizer import train_sentencepiece
  proto = train_sentencepiece([corpus.document(0, i) for i in range(300)], 400).model_proto
  path = tmp_path_factory.mktemp("tok400") / "tokenizer.model"
  path.write_bytes(proto)
  return str(path), proto


def test_pretraining_refuses_bad_lengths_and_tokenizers_before_writing(tmp_path, tokenizer_400):
  from train.loop import pretrain_stage
  c = get_config()
  c.data.seq_len = 4096
  with pytest.raises(ValueError, match=r"config.data.seq_len 4096 exceeds the model's "
                                       r"max_seq_len 128"):
    pretrain_stage(c, str(tmp_path / "long"))
  assert not os.listdir(tmp_path / "long")
  c = get_config()
  c.tokenizer.kind, c.tokenizer.path = "sentencepiece", tokenizer_400[0]
  c.model_overrides.vocab_size = 320
  with pytest.raises(ValueError, match=r"the tokenizer has 400 tokens but "
                                       r"config.model_overrides.vocab_size is 320"):
    pretrain_stage(c, str(tmp_path / "vocab"))
  assert not os.path.exists(tmp_path / "vocab" / "run_config.json")
  c.model_overrides.vocab_size, c.data.builtin_docs, c.data.eval_fraction = 512, 40, 0.01
  with pytest.raises(ValueError, match=r"the eval split of this process is empty"):
    pretrain_stage(c, str(tmp_path / "no_eval"))  # Now, not at the first evaluation.
  assert not os.path.exists(tmp_path / "no_eval" / "run_config.json")


def test_post_training_refuses_a_tokenizer_that_is_not_the_models(tmp_path, tiny_pretrain,
                                                                 tokenizer_400):
  from posttrain.start import load_chat_model
  workdir = tmp_path / "other_tokenizer"
  shutil.copytree(tiny_pretrain, workdir)
  (workdir / "tokenizer.model").write_bytes(tokenizer_400[1])
  with pytest.raises(ValueError, match=r"its tokenizer has 400 tokens but its model's vocabulary "
                                       r"is 320: not this model's tokenizer"):
    load_chat_model(str(workdir))


def test_batches_micro_batches_and_the_mesh_must_divide():
  mesh = types.SimpleNamespace(shape=dict(data=2, fsdp=1, expert=2, tensor=1))
  check_batch_layout(8, 2, mesh)
  with pytest.raises(ValueError, match=r"config.step.microbatches 3 must be >= 1 and divide the "
                                       r"batch of 8 rows \(config.data.batch_size\)"):
    check_batch_layout(8, 3, mesh)
  with pytest.raises(ValueError, match=r"micro-batch of 6 rows \(batch 6 from config.rollout.x / "
                                       r"1 micro-batches\) does not divide over the mesh's 4 batch "
                                       r"shards \(data=2 x fsdp=1 x expert=2\)"):
    check_batch_layout(6, 1, mesh, "config.rollout.x")
  from model.sharding import MeshConfig
  with pytest.raises(ValueError, match=r"does not divide 8 devices"):
    MeshConfig(data=3, fsdp=-1).ici_shape(8)
  with pytest.raises(ValueError, match=r"uses 4 devices"):
    MeshConfig(data=2, fsdp=2).ici_shape(8)


def test_a_reward_that_cannot_take_the_fields_or_is_not_callable():
  with pytest.raises(TypeError, match=r"reward 'plain': a reward is called as fn\(prompts, "
                                      r"completions, \*\*fields\)"):
    RewardSet({"plain": lambda prompts, completions: [0.0] * len(completions)}, {"plain": 1.0})
  with pytest.raises(TypeError, match=r"reward 'number' is a float, not a callable"):
    RewardSet({"number": 1.0, "format": think_format}, {"number": 1.0, "format": 1.0})
  with pytest.raises(TypeError, match=r"reward 'bare' must return a list of 2 numbers, got float"):
    RewardSet({"bare": lambda p, c, **f: 1.0}, {"bare": 1.0})(["a", "b"], ["x", "y"])
  with pytest.raises(ValueError, match=r"reward 'scalar' returned 1 values for 2 completions"):
    RewardSet({"scalar": lambda p, c, **f: [np.float64(1.0)]}, {"scalar": 1.0})(["a", "b"],
                                                                                ["x", "y"])
