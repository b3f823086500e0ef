"""The main job: the pipeline's pieces against direct computations, and the quickstart notebook run
headless (nbclient) at its smallest budget through every stage, then re-run to skip them all."""

import json
import math
import os

import numpy as np
import pytest

from configs import pipeline as pipeline_config
from posttrain import pipeline
from train.metrics import read_metrics

from conftest import small_config
from test_chat import CharTokenizer

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_chat_perplexity_matches_a_direct_loop():
  import jax
  from model.transformer import init_model
  from posttrain.chat import encode_chat
  model = init_model(small_config(vocab_size=140, max_seq_len=64), seed=3)
  tokenizer = CharTokenizer()
  chats = [[{"role": "user", "content": f"add {i} and {i + 1}"},
            {"role": "assistant", "content": f"<think>{i}+{i + 1}</think>{2 * i + 1}"}]
           for i in range(5)]
  got = pipeline.chat_perplexity(model, tokenizer, chats, batch_size=2)
  nll, count = 0.0, 0
  for messages in chats:  # One chat at a time, each token's log-softmax in float64.
    tokens, mask = encode_chat(tokenizer, messages)
    logits = np.asarray(model(jax.numpy.asarray([tokens])).logits[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for t in range(1, len(tokens)):
      if mask[t]:
        nll -= logp[t - 1, tokens[t]]
        count += 1
  assert count > 20
  np.testing.assert_allclose(got, math.exp(nll / count), rtol=1e-5)


def test_stage_list_is_checked():
  c = pipeline_config.get_config()
  c.stages = "base,sft,dpo"
  assert pipeline.stage_names(c) == ["base", "sft", "dpo"]
  c.stages = "dpo,sft,base"
  assert pipeline.stage_names(c) == ["base", "sft", "dpo"]
  c.stages = "base,grpo"
  with pytest.raises(ValueError, match="'grpo' starts from 'dpo'"):
    pipeline.stage_names(c)
  c.stages = "base,ppo"
  with pytest.raises(ValueError, match="unknown stage 'ppo'"):
    pipeline.stage_names(c)


def test_read_metrics_keeps_the_last_row_per_step(tmp_path):
  lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5},
           {"step": 3, "loss": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 4')
  assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 3.0), (2, 1.5),
                                                                           (3, 1.0)]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2: not JSON"):
    read_metrics(str(tmp_path))
  assert read_metrics(str(tmp_path / "absent")) == []


@pytest.mark.slow
def test_quickstart_notebook_runs_every_stage_and_a_rerun_skips_them(tmp_path):
  import nbclient
  import nbformat
  workdir = str(tmp_path / "demo")
  notebook = nbformat.read(os.path.join(_ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
  assert len(parameters) == 1
  parameters[0].source = f'VARIANT = "smoke"\nWORKDIR = {workdir!r}'
  nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(_ROOT, "notebooks")}}).execute()
  images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})]

  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  stages = [s["stage"] for s in report["stages"]]
  assert stages == ["base", "sft", "reward_model", "dpo", "grpo"]
  c = pipeline_config.get_config("smoke")
  tasks = c.eval.tasks.split(",")
  for s in report["stages"]:
    assert s["wall_seconds"] > 0 and os.path.isdir(s["workdir"])
    if s["stage"] == "reward_model":
      assert 0.0 <= s["eval"]["pairs"]["accuracy"] <= 1.0
      continue
    assert sorted(s["eval"]) == sorted(tasks)
    for t in tasks:
      e = s["eval"][t]
      for key in ("pass_at_1", "sampled_pass_at_1", f"pass_at_{c.eval.samples}", "format_rate"):
        assert 0.0 <= e[key] <= 1.0, (s["stage"], t, key)
      assert e[f"pass_at_{c.eval.samples}"] >= e["sampled_pass_at_1"]
      assert 0 < e["mean_length"] <= c.eval.max_new_tokens
      with open(os.path.join(s["workdir"], "eval", f"{t}.json")) as f:
        assert json.load(f)["greedy"]["pass_at_1"] == e["pass_at_1"]
    assert 1.0 < s["perplexity"] < 1e4
  assert report["stages"][0]["perplexity_on"] == "pre-training held-out text"
  assert report["stages"][1]["perplexity_on"].startswith("held-out reference solutions")
  names = sorted(os.path.basename(p) for p in report["plots"])
  assert names == sorted(["pretrain_loss.png", "expert_balance.png", "sft_loss.png",
                          "reward_model.png", "dpo_margins.png", "grpo.png", "pass_at_1.png"])
  for path in report["plots"]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert len(images) == len(report["plots"])

  # A re-run finds every stage finished: nothing trains, the rows are the same.
  again = pipeline.run_pipeline(c, workdir)
  assert again["stages"] == report["stages"]
  # A finished stage's config may not change under it.
  c.eval.n += 1
  with pytest.raises(ValueError, match="base/pipeline.json: stage 'base' was finished with another"):
    pipeline.run_pipeline(c, workdir)
