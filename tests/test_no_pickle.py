"""No loading path unpickles: checkpoints (Orbax), tokenizers, chat data and DPO's cached
reference log-probs all load while every pickle entry point raises."""

import _pickle
import json
import pickle

import numpy as np
import pytest


@pytest.fixture
def no_pickle(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a loading path unpickled")
  for module in (pickle, _pickle):
    for name in ("load", "loads", "Unpickler"):
      monkeypatch.setattr(module, name, refuse)
  with pytest.raises(AssertionError, match="unpickled"):  # The guard itself bites.
    pickle.loads(pickle.dumps([1]))


def test_loading_paths_never_unpickle(no_pickle, tiny_pretrain, tmp_path):
  from posttrain.data import read_chat_jsonl
  from posttrain.dpo import cached_reference
  from posttrain.preferences import encode_pairs, task_preferences
  from posttrain.start import load_chat_model
  from train.checkpoint import load_model
  from train.tokenizer import load_tokenizer
  model, tokenizer = load_model(tiny_pretrain), load_tokenizer(tiny_pretrain)
  assert model.cfg.vocab_size == 320 and tokenizer.vocab_size == 320
  policy, chat_tokenizer = load_chat_model(tiny_pretrain, str(tmp_path / "stage"))
  path = tmp_path / "chats.jsonl"
  path.write_text(json.dumps({"prompt": "1 + 1", "completion": "<think>1 + 1 = 2</think>2"}) + "\n")
  assert len(read_chat_jsonl(str(path))) == 1
  pairs = encode_pairs(chat_tokenizer, task_preferences("arithmetic", "train", 2), 64)
  cache = str(tmp_path / "reference.npz")
  written = cached_reference(cache, policy, pairs, tiny_pretrain, 64, 2)
  read = cached_reference(cache, policy, pairs, tiny_pretrain, 64, 2)  # From the file.
  np.testing.assert_array_equal(written["ref_chosen"], read["ref_chosen"])
