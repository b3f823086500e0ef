"""The main job: pre-train the tiny model, then SFT, a reward model, DPO and GRPO, evaluating the
policy after every stage on held-out problems; one table, DIR/report.json and plots.

  python -m posttrain.pipeline --workdir=workdir/demo                   # make demo
  python -m posttrain.pipeline --config=configs/pipeline.py:smoke --workdir=/tmp/demo

Each stage trains in DIR/STAGE through the one loop (train/loop.py) and, once trained and
evaluated, writes DIR/STAGE/pipeline.json. Re-running the command skips finished stages and
resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import ml_collections
import numpy as np

STAGES = ("base", "sft", "reward_model", "dpo", "grpo")
STARTS_FROM = dict(sft="base", reward_model="sft", dpo="sft", grpo="dpo")
POLICY_STAGES = ("base", "sft", "dpo", "grpo")


def stage_names(c: ml_collections.ConfigDict) -> list[str]:
  """The configured stages, checked: a prefix-closed subset of STAGES in their order."""
  names = [s.strip() for s in c.stages.split(",") if s.strip()]
  for name in names:
    if name not in STAGES:
      raise ValueError(f"config.stages: unknown stage {name!r}; known: {', '.join(STAGES)}")
    if name in STARTS_FROM and STARTS_FROM[name] not in names:
      raise ValueError(f"config.stages: {name!r} starts from {STARTS_FROM[name]!r}, "
                       "which is not in the list")
  return sorted(names, key=STAGES.index)


def _train(name: str, c: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs (or resumes) stage `name` to its total_steps."""
  if name == "base":
    from train.loop import pretrain
    pretrain(c, workdir)
  elif name == "sft":
    from posttrain.sft import sft
    sft(c, workdir)
  elif name == "reward_model":
    from posttrain.reward_model import reward_model
    reward_model(c, workdir)
  elif name == "dpo":
    from posttrain.dpo import dpo
    dpo(c, workdir)
  else:
    from posttrain.grpo import grpo
    grpo(c, workdir)


def chat_perplexity(model, tokenizer, chats: list[list[dict]], batch_size: int = 32) -> float:
  """exp(mean NLL) of the assistant tokens of `chats` (one chat per row, cut at max_seq_len)."""
  from posttrain.chat import encode_chat
  from train.loss import jitted_logprobs
  encoded = [encode_chat(tokenizer, m) for m in chats]
  width = min(max(len(t) for t, _ in encoded), model.cfg.max_seq_len)
  nll, count = 0.0, 0.0
  for start in range(0, len(encoded), batch_size):
    tokens = np.zeros((batch_size, width), np.int32)  # Fixed shape: one compilation.
    mask = np.zeros((batch_size, width), np.int32)
    for row, (t, m) in enumerate(encoded[start:start + batch_size]):
      tokens[row, :len(t[:width])], mask[row, :len(m[:width])] = t[:width], m[:width]
    _, sums = jitted_logprobs(model, tokens, mask)
    nll -= float(np.asarray(sums).sum())
    count += float(mask[:, 1:].sum())
  return math.exp(nll / count)


def evaluate_policy(name: str, path: str, e: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """(summary per task, perplexity entry) of the policy in `path`; full reports are written to
  PATH/eval/TASK.json. The base model is asked in plain text, the chat stages in the chat format;
  the base model's perplexity is its pre-training held-out one, the chat stages' is on held-out
  reference solutions."""
  from posttrain.eval import evaluate
  from posttrain.sft import task_chats
  from posttrain.start import load_chat_model
  from posttrain.tasks import get_task, task_names
  from train.metrics import read_metrics
  model, tokenizer = load_chat_model(path)
  style = "plain" if name == "base" else "chat"
  ks = (1, e.samples) if e.samples else (1,)
  summary = {}
  for task_name in task_names(e.tasks):
    task = get_task(task_name)
    problems = task.problems("test", e.n, e.seed)
    report = evaluate(model, tokenizer, task, problems, e.samples, ks, temperature=e.temperature,
                      max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                      prompt_style=style, seed=e.seed)
    _write_json(os.path.join(path, "eval", f"{task_name}.json"), report)
    row = dict(pass_at_1=report["greedy"]["pass_at_1"], format_rate=report["greedy"]["format_rate"],
               mean_length=report["greedy"]["mean_length"])
    if e.samples:
      row["sampled_pass_at_1"] = report["sampled"]["pass_at_1"]
      row[f"pass_at_{e.samples}"] = report["sampled"]["pass_at_k"][str(e.samples)]
    summary[task_name] = row
  if name == "base":
    logged = [r["eval_perplexity"] for r in read_metrics(path) if "eval_perplexity" in r]
    perplexity = dict(value=logged[-1] if logged else None, on="pre-training held-out text")
  else:
    chats = task_chats(e.tasks, "test", e.perplexity_chats, e.seed)
    perplexity = dict(value=chat_perplexity(model, tokenizer, chats),
                      on="held-out reference solutions (assistant tokens)")
  return summary, perplexity


def evaluate_reward_model(path: str) -> dict:
  """The reward model's last held-out pairwise accuracy and reward margin, from its metrics."""
  from train.metrics import read_metrics
  rows = [r for r in read_metrics(path) if "eval_accuracy" in r]
  if not rows:
    raise ValueError(f"{path}/metrics.jsonl has no eval_accuracy: set reward_model.eval_every")
  return dict(pairs=dict(accuracy=rows[-1]["eval_accuracy"], margin=rows[-1].get("eval_margin")))


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def _fingerprint(c: ml_collections.ConfigDict, name: str) -> str:
  """A hash of what decides stage `name`'s result: its config and the evaluation settings. An
  unset context override (model_overrides.max_seq_len 0) is left out, so stages finished before
  that field existed keep their fingerprints."""
  stage = c[name].to_dict()
  if not stage.get("model_overrides", {}).get("max_seq_len", 1):
    del stage["model_overrides"]["max_seq_len"]
  text = (ml_collections.ConfigDict(stage).to_json(sort_keys=True)
          + c.eval.to_json(sort_keys=True))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_stage(name: str, c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates stage `name` unless DIR/STAGE/pipeline.json says it is finished;
  returns its report row."""
  path = os.path.join(workdir, name)
  marker = os.path.join(path, "pipeline.json")
  fingerprint = _fingerprint(c, name)
  if os.path.exists(marker):
    with open(marker) as f:
      row = json.load(f)
    if row.get("fingerprint") != fingerprint:
      raise ValueError(f"{marker}: stage {name!r} was finished with another config or evaluation "
                       "setting; use a new --workdir (or delete that stage's directory)")
    print(f"pipeline: {name} already finished ({marker})", flush=True)
    return row
  stage_config = ml_collections.ConfigDict(c[name].to_dict())
  if name in STARTS_FROM:
    stage_config.init_from = os.path.join(workdir, STARTS_FROM[name])
  print(f"pipeline: {name} -> {path}", flush=True)
  start = time.perf_counter()
  _train(name, stage_config, path)
  train_seconds = time.perf_counter() - start
  if name in POLICY_STAGES:
    evaluation, perplexity = evaluate_policy(name, path, c.eval)
  else:
    evaluation, perplexity = evaluate_reward_model(path), dict(value=None, on=None)
  row = dict(stage=name, workdir=path, wall_seconds=time.perf_counter() - start,
             train_seconds=train_seconds, eval=evaluation, perplexity=perplexity["value"],
             perplexity_on=perplexity["on"], fingerprint=fingerprint)
  _write_json(marker, row)
  return row


def table(rows: list[dict]) -> str:
  """One line per policy stage: per task pass@1, pass@k, format rate and mean length; the held-out
  perplexity; then the reward model's held-out accuracy."""
  policy = [r for r in rows if r["stage"] in POLICY_STAGES]
  if not policy:
    return ""
  tasks = list(policy[0]["eval"])
  k_key = next((k for k in policy[0]["eval"][tasks[0]] if k.startswith("pass_at_")
                and k != "pass_at_1"), None)
  head = f"{'stage':14}" + "".join(
      f" | {t[:10]:>10} p@1" + (f" {'p@' + k_key[8:]:>5}" if k_key else "") + "  fmt   len" for t in tasks)
  lines = [head + " |  ppl   | minutes", "-" * (len(head) + 20)]
  for r in policy:
    cells = ""
    for t in tasks:
      s = r["eval"][t]
      cells += f" | {s['pass_at_1']:14.3f}" + (f" {s[k_key]:5.3f}" if k_key else "")
      cells += f" {s['format_rate']:5.2f} {s['mean_length']:5.1f}"
    ppl = f"{r['perplexity']:6.3f}" if r["perplexity"] is not None else "   -  "
    lines.append(f"{r['stage']:14}{cells} | {ppl} | {r['wall_seconds'] / 60:6.1f}")
  for r in rows:
    if r["stage"] == "reward_model":
      lines.append(f"reward model: held-out pairwise accuracy {r['eval']['pairs']['accuracy']:.3f} "
                   f"({r['wall_seconds'] / 60:.1f} minutes)")
  lines.append("p@1: greedy pass@1 on held-out problems; fmt: <think>...</think> format rate; len: "
               "mean response tokens; ppl: base on pre-training held-out text, the others on "
               "held-out reference solutions.")
  return "\n".join(lines)


def run_pipeline(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured stage in order (skipping finished ones), then writes DIR/report.json
  and the plots; returns the report."""
  from posttrain.plots import pipeline_plots
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for name in stage_names(c):
    rows.append(run_stage(name, c, workdir))
    print(table(rows), flush=True)
  stages = [{k: v for k, v in r.items() if k != "fingerprint"} for r in rows]
  report = dict(stages=stages, plots=pipeline_plots(workdir, stages))
  _write_json(os.path.join(workdir, "report.json"), report)
  return report


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "pipeline.py"), "Pipeline config file.")
  _WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "One directory per stage, the report.")

  def main(argv):
    del argv
    from train.metrics import quiet_logging
    quiet_logging()
    report = run_pipeline(_CONFIG.value, _WORKDIR.value)
    print(table(report["stages"]))
    print(f"report: {os.path.join(_WORKDIR.value, 'report.json')}; plots: "
          f"{', '.join(report['plots'])}", flush=True)
  app.run(main)
