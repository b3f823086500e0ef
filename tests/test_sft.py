"""SFT data (packing, truncation, resumable batches, JSONL errors), LoRA, pass@k and the SFT ->
merge -> eval path end to end on a tiny pre-trained workdir."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from model.transformer import init_model
from posttrain import lora
from posttrain.data import (PackedBatches, bucket_width, pack_rows, packed_batch, prepare,
                            read_chat_jsonl)
from posttrain.eval import pass_at_k


def _examples(lengths, seed=0):
  r = np.random.default_rng(seed)
  encoded = []
  for i, n in enumerate(lengths):
    tokens = list(100 * (i + 1) + np.arange(n))
    mask = [0] * (n // 2) + [1] * (n - n // 2)
    encoded.append((tokens, mask))
  return encoded


def test_packing_keeps_examples_whole_and_masks_assistant_targets():
  examples = prepare(_examples([5, 9, 3, 7, 16, 2]), row_len=17)
  rows = pack_rows([len(t) for t in examples.tokens], [4, 0, 1, 2, 3, 5], 17)
  assert rows == [[4], [0, 1, 2], [3, 5]]
  batch = packed_batch(examples, rows, seq_len=16)
  row = np.concatenate([batch["inputs"][1], batch["targets"][1][-1:]])
  assert list(row[:5]) == list(examples.tokens[0]) and list(row[5:14]) == list(examples.tokens[1])
  assert list(batch["segment_ids"][1][:17]) == [1] * 5 + [2] * 9 + [3] * 2
  assert list(batch["positions"][1][:6]) == [0, 1, 2, 3, 4, 0]
  # Target t is weighted iff it is an assistant token of the same example as input t.
  for b in range(3):
    for t in range(16):
      seg = batch["segment_ids"][b, t]
      expected = 0.0
      if seg and t + 1 < 17:
        i = rows[b][seg - 1]
        start = sum(len(examples.tokens[j]) for j in rows[b][:seg - 1])
        k = t + 1 - start
        expected = float(examples.masks[i][k]) if k < len(examples.tokens[i]) else 0.0
      assert batch["loss_mask"][b, t] == expected, (b, t)


def test_bucket_width_rounds_up_within_the_limit():
  assert bucket_width([3, 40], 128) == 64 and bucket_width([64], 128) == 64
  assert bucket_width([120], 128) == 128 and bucket_width([120], 125) == 125
  assert bucket_width([130], 128) == 130  # Never below the longest row.


def test_truncation_policy_is_applied_and_counted():
  long = _examples([30, 4, 40])
  kept = prepare(long, row_len=17, truncation="truncate")
  # The 40-token example's answer starts at token 20: its head has nothing to train on.
  assert (kept.truncated, kept.dropped) == (1, 1) and [len(t) for t in kept.tokens] == [17, 4]
  assert kept.masks[0].sum() == 2
  dropped = prepare(long, row_len=17, truncation="drop")
  assert (dropped.truncated, dropped.dropped) == (0, 2) and len(dropped.tokens) == 1
  with pytest.raises(ValueError, match="truncation must be"):
    prepare(long, 17, "wrap")


def test_packed_batches_shuffle_per_epoch_and_resume_exactly():
  examples = prepare(_examples([3, 4, 5, 6, 7] * 6), row_len=17)
  it = PackedBatches(examples, 16, batch_size=2, seed=3)
  per_epoch = it.batches_per_epoch()
  first = [next(it)["inputs"] for _ in range(per_epoch + 2)]  # Crosses an epoch boundary.
  state = it.get_state()
  assert state["epoch"] == 1
  rest = [next(it)["inputs"] for _ in range(3)]
  again = PackedBatches(examples, 16, batch_size=2, seed=3)
  again.set_state(json.loads(json.dumps(state)))
  assert all(np.array_equal(a, b) for a, b in zip(rest, [next(again)["inputs"] for _ in range(3)]))
  assert not np.array_equal(first[0], first[per_epoch])  # A new epoch is a new order.
  with pytest.raises(ValueError, match="fewer than one batch"):
    PackedBatches(examples, 16, batch_size=64)


def test_chat_jsonl_forms_and_errors(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_text(
      json.dumps({"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "<think>x</think>yo"}]}) + "\n" +
      json.dumps({"prompt": "2 + 2?", "completion": "4"}) + "\n")
  chats = read_chat_jsonl(str(path))
  assert chats[1] == [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
  for line, match in [('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
                      ('{"prompt": "x"}', "needs 'messages' or 'prompt' and 'completion'"),
                      ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
                      ("[1, 2]", "expected a JSON object"), ("{bad", "not valid JSON")]:
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"sft.jsonl:2: .*{match}"):
      read_chat_jsonl(str(path))
  path.write_text("\n")
  with pytest.raises(ValueError, match="no records"):
    read_chat_jsonl(str(path))


def test_pass_at_k_matches_enumeration():
  for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (8, 3, 8), (7, 1, 2)]:
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    assert math.isclose(pass_at_k(n, c, k), np.mean([any(s) for s in subsets]), abs_tol=1e-12)


@pytest.fixture(scope="module")
def model():
  return init_model(small_config(q_lora_rank=16), seed=0)


ALL = lora.LoraConfig(rank=3, alpha=6.0, targets=",".join(lora.TARGETS))


def test_lora_merge_matches_a_float64_reference_and_starts_at_the_base(model):
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  adapters = jax.jit(lambda p: lora.init_adapters(p, ALL, seed=1))(params)  # Eager: 100s of ops.
  merge = jax.jit(lambda p, a: lora.merge_params(p, a, ALL.scale))
  names = {lora.target_name(p) for p, _ in lora._walk_adapters(adapters)}
  assert names == set(lora.TARGETS) - {"q"}  # q exists only without q_lora_rank.
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(merge(params, adapters))):
    np.testing.assert_array_equal(x, y)
  rng = np.random.default_rng(2)
  for path, ab in lora._walk_adapters(adapters):  # Nonzero B everywhere.
    ab["b"] = rng.normal(size=ab["b"].shape).astype(np.float32)
  merged = merge(params, adapters)
  for path, ab in lora._walk_adapters(adapters):
    w = np.asarray(lora._get(params, path), np.float64)
    a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
    lead = {"o": a.ndim - 3}.get(path[-2], a.ndim - 2)
    n_in = a.ndim - 1 - lead
    letters = "abcdefgh"
    lead_s, in_s, out_s = letters[:lead], "ij"[:n_in], "kl"[:b.ndim - 1 - lead]
    reference = w + ALL.scale * np.einsum(f"{lead_s}{in_s}r,{lead_s}r{out_s}->{lead_s}{in_s}{out_s}", a, b)
    np.testing.assert_allclose(np.asarray(lora._get(merged, path)), reference, rtol=1e-5, atol=1e-5)


def test_lora_step_trains_only_adapters(model):
  from train.step import StepConfig, create_train_state, make_train_step
  import optax
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  cfg = lora.LoraConfig(rank=2, targets="q_a,kv_b,o,experts")
  adapters = lora.init_adapters(params, cfg)
  tx = optax.adam(1e-2)
  template, state = create_train_state(model, tx, params=adapters)
  assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
  step = jax.jit(make_train_step(template, tx, StepConfig(), model_params=lambda t, f:
                                 lora.merge_params(f["base"], t, cfg.scale)))
  r = np.random.default_rng(0)
  tokens = r.integers(0, 61, (2, 17)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones((2, 16), np.int32),
               positions=np.tile(np.arange(16, dtype=np.int32), (2, 1)),
               loss_mask=np.ones((2, 16), np.float32))
  frozen = dict(base=params)
  new, metrics = step(state, batch, frozen)
  assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
  moved = lambda new: [(p[-1].key, bool(jnp.any(x != y))) for (p, x), y in
                       zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(adapters))]
  # B = 0 at the start gives A no gradient: the first step moves every B, the second every A.
  assert all(changed == (name == "b") for name, changed in moved(new.params))
  new, _ = step(new, batch, frozen)
  assert all(changed for _, changed in moved(new.params))
  n_trained = sum(x.size for x in jax.tree.leaves(new.params))
  assert n_trained < 0.2 * sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_sft_lora_merge_and_eval_end_to_end(tmp_path, tiny_pretrain):
  """From a 3-step pre-training, SFT with LoRA 3 steps, merge; the merged export equals the
  in-training model (1e-5); eval reads both and writes its report."""
  from configs.sft import get_config as sft_config
  from posttrain.eval import run_eval
  from posttrain.sft import sft
  from posttrain.start import load_chat_model
  from train.checkpoint import load_model
  s = sft_config("lora")
  s.init_from = tiny_pretrain
  s.total_steps, s.log_every, s.checkpoint_every, s.eval_every = 3, 1, 3, 3
  s.optimizer.warmup_steps, s.peak_flops, s.eval_batches = 1, 1e11, 1
  s.data.builtin_examples, s.data.eval_examples, s.data.batch_size = 40, 8, 2
  s.lora.targets = "q_a,q_b,kv_a,kv_b,o,experts"
  rows = sft(s, str(tmp_path / "sft"))
  assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["eval_loss"])
  with pytest.raises(ValueError, match="holds LoRA adapters"):
    load_model(str(tmp_path / "sft"))
  lora.merge(str(tmp_path / "sft"), str(tmp_path / "merged"))
  unmerged, tokenizer = load_chat_model(str(tmp_path / "sft"))
  merged = load_model(str(tmp_path / "merged"))
  base = load_model(tiny_pretrain)
  assert merged.cfg.vocab_size == tokenizer.vocab_size > base.cfg.vocab_size
  # Every adapted weight moved (the adapters trained), in dense and MoE layers alike.
  merged_params = nnx.to_pure_dict(nnx.state(merged, nnx.Param))
  base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
  adapted = [path for path, _ in lora._walk(merged_params)
             if lora.target_name(path) in s.lora.targets.split(",")]
  assert {p[0] for p in adapted} >= {"dense_layers", "moe_layers"}
  for path in adapted:
    assert not np.array_equal(lora._get(merged_params, path), lora._get(base_params, path)), path
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, tokenizer.vocab_size, (2, 12)), jnp.int32)
  np.testing.assert_allclose(merged(tokens).logits, unmerged(tokens).logits, atol=1e-5, rtol=1e-5)
  report = run_eval(str(tmp_path / "merged"), "countdown", n=4, samples=2, ks=(1, 2),
                    max_new_tokens=8, batch_size=4, show_progress=False)
  assert report["n"] == 4 and set(report["sampled"]["pass_at_k"]) == {"1", "2"}
  assert 0 <= report["greedy"]["pass_at_1"] <= 1 and report["greedy"]["max_length"] <= 8
  assert json.load(open(tmp_path / "merged" / "eval" / "countdown.json"))["task"] == "countdown"
