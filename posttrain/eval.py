"""Evaluation of any checkpoint on verifiable problems: pass@1 (greedy and sampled), unbiased
pass@k, format rate, response lengths, a breakdown by difficulty; one JSON report and a table.

  python -m posttrain.eval --checkpoint=workdir/sft --task=arithmetic --n=200 --samples=8 --k=1,8
  python -m posttrain.eval --checkpoint=DIR --task=gsm8k --data=test.jsonl
  python -m posttrain.eval --checkpoint=workdir/pretrain --task=arithmetic --prompt_style=plain

`--checkpoint` is a pre-training or post-training workdir (LoRA ones are merged on load) or a HF
directory. Problems come from the task's held-out ("test") split. prompt_style "chat" asks in the
chat format and parses `<think>…</think>answer`; "plain" gives a base model the prompt as
pre-training text ("Compute (3 + 4) * 2.") and reads the first line it writes.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import numpy as np

from model.sampling import SamplingConfig
from posttrain import chat, rollout
from posttrain.start import load_chat_model
from posttrain.tasks import Problem, get_task
from posttrain.tasks.base import verify_all

def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimator 1 - C(n-c, k) / C(n, k) for c correct of n samples."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _score(task, tokenizer, problems, responses, repeat: int, style: str):
  """Per problem: lists of (correct, well formed, length) over its `repeat` responses."""
  rows = [[] for _ in problems]
  texts = [rollout.response_text(tokenizer, ids, style) for ids in responses.tokens]
  verdicts = verify_all(task, [problems[i // repeat] for i in range(len(texts))], texts)
  for i, (ids, text, verdict) in enumerate(zip(responses.tokens, texts, verdicts)):
    rows[i // repeat].append((verdict.correct, chat.parse_response(text).well_formed, len(ids),
                              text, verdict.reason))
  return rows


def _summary(rows) -> dict:
  flat = [r for per in rows for r in per]
  lengths = [r[2] for r in flat]
  return dict(pass_at_1=float(np.mean([r[0] for r in flat])),
              format_rate=float(np.mean([r[1] for r in flat])),
              mean_length=float(np.mean(lengths)), max_length=int(max(lengths)))


def evaluate(model, tokenizer, task, problems: list[Problem], samples: int = 0, ks=(1,),
             temperature: float = 1.0, max_new_tokens: int = 64, batch_size: int = 64,
             prompt_style: str = "chat", seed: int = 0, show_progress: bool = True) -> dict:
  """The report for `problems`: greedy decoding, then (if samples > 0) `samples` sampled
  responses per problem with pass@k for each k <= samples."""
  from tqdm import tqdm
  prompts = [rollout.prompt_tokens(tokenizer, p, prompt_style) for p in problems]
  stops = chat.stop_tokens(tokenizer) if prompt_style == "chat" else (tokenizer.eos_id,)
  pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
  limit = model.cfg.max_seq_len - max(len(p) for p in prompts)
  if limit < 1:
    raise ValueError(f"the longest prompt has {max(len(p) for p in prompts)} tokens: no room to "
                     f"answer within max_seq_len {model.cfg.max_seq_len}")
  max_new_tokens = min(max_new_tokens, limit)
  total = len(prompts) * (1 + samples)
  bar = tqdm(total=total, desc=f"eval {task.name}", unit="resp", disable=not show_progress,
             file=sys.stderr)
  greedy_cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_tokens=stops,
                              pad_token=pad)
  key = jax.random.key(seed)
  greedy = _score(task, tokenizer, problems,
                  rollout.sample(model, prompts, greedy_cfg, key, batch_size, bar), 1, prompt_style)
  report = dict(task=task.name, n=len(problems), prompt_style=prompt_style,
                max_new_tokens=max_new_tokens, greedy=_summary(greedy))
  by_difficulty = collections.defaultdict(list)
  for p, r in zip(problems, greedy):
    by_difficulty[p.difficulty].append(r[0][0])
  report["by_difficulty"] = {str(d): dict(n=len(v), greedy_pass_at_1=float(np.mean(v)))
                             for d, v in sorted(by_difficulty.items())}
  if samples:
    sampled_cfg = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens,
                                 stop_tokens=stops, pad_token=pad)
    repeated = [p for p in prompts for _ in range(samples)]
    sampled = _score(task, tokenizer, problems,
                     rollout.sample(model, repeated, sampled_cfg, jax.random.fold_in(key, 1),
                                    batch_size, bar), samples, prompt_style)
    summary = _summary(sampled)
    correct = [sum(r[0] for r in per) for per in sampled]
    summary["pass_at_k"] = {str(k): float(np.mean([pass_at_k(samples, c, k) for c in correct]))
                            for k in ks if k <= samples}
    summary["temperature"] = temperature
    report["sampled"] = summary
    for d in report["by_difficulty"]:
      rows = [c for p, c in zip(problems, correct) if str(p.difficulty) == d]
      report["by_difficulty"][d]["sampled_pass_at_1"] = float(np.mean(rows) / samples)
  bar.close()
  report["examples"] = [dict(prompt=p.prompt, response=r[0][3], reason=r[0][4])
                        for p, r in zip(problems[:5], greedy[:5])]
  return report


def greedy_probe(tokenizer, task_names, n: int, max_new_tokens: int = 64, batch_size: int = 64,
                 seed: int = 0):
  """`model -> {"eval_TASK_pass_at_1": greedy pass@1}` on `n` held-out problems of each family in
  `task_names` (drawn once): a training stage's `evaluate` hook, so that RL logs held-out accuracy
  over its steps."""
  tasks = {name: get_task(name) for name in task_names}
  problems = {name: task.problems("test", n, seed) for name, task in tasks.items()}

  def probe(model) -> dict:
    return {f"eval_{name}_pass_at_1": evaluate(
        model, tokenizer, task, problems[name], samples=0, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed, show_progress=False)["greedy"]["pass_at_1"]
        for name, task in tasks.items()}
  return probe


def table(report: dict) -> str:
  """The report as a small text table."""
  lines = [f"{report['task']} ({report['n']} held-out problems, {report['prompt_style']} prompts)",
           f"{'':10} {'pass@1':>8} {'format':>8} {'mean len':>9} {'max len':>8}"]
  for name in ("greedy", "sampled"):
    if name in report:
      s = report[name]
      lines.append(f"{name:10} {s['pass_at_1']:8.3f} {s['format_rate']:8.3f} "
                   f"{s['mean_length']:9.1f} {s['max_length']:8d}")
  for k, v in report.get("sampled", {}).get("pass_at_k", {}).items():
    lines.append(f"pass@{k:<5} {v:8.3f}")
  for d, v in report["by_difficulty"].items():
    lines.append(f"difficulty {d}: n={v['n']} greedy pass@1 {v['greedy_pass_at_1']:.3f}")
  return "\n".join(lines)


def run_eval(checkpoint: str, task_name: str, n: int = 200, samples: int = 8, ks=(1, 8),
             data: str = "", out: str = "", seed: int = 0, **kwargs) -> dict:
  """Loads `checkpoint`, evaluates `n` held-out problems of `task_name`, writes the JSON report
  (default CHECKPOINT/eval/TASK.json) and returns it."""
  model, tokenizer = load_chat_model(checkpoint)
  task = get_task(task_name, data=data)
  problems = task.problems("test", n, seed)
  report = evaluate(model, tokenizer, task, problems, samples, ks, seed=seed, **kwargs)
  report["checkpoint"] = checkpoint
  out = out or os.path.join(checkpoint, "eval", f"{task_name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  os.replace(out + ".tmp", out)
  report["path"] = out
  return report


def main(argv):
  del argv
  from train.metrics import quiet_logging
  quiet_logging()
  f = flags.FLAGS
  report = run_eval(f.checkpoint, f.task, f.n, f.samples, tuple(int(k) for k in f.k), f.data,
                    f.out, f.seed, temperature=f.temperature, max_new_tokens=f.max_new_tokens,
                    batch_size=f.batch_size, prompt_style=f.prompt_style)
  print(table(report))
  print(f"report: {report['path']}", flush=True)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("checkpoint", None, "A workdir or HF directory.", required=True)
  flags.DEFINE_string("task", "arithmetic", "arithmetic, countdown, gsm8k or math.")
  flags.DEFINE_integer("n", 200, "Held-out problems.")
  flags.DEFINE_integer("samples", 8, "Sampled responses per problem (0: greedy only).")
  flags.DEFINE_list("k", ["1", "8"], "pass@k for these k.")
  flags.DEFINE_string("data", "", "JSONL file for gsm8k / math.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_integer("max_new_tokens", 64, "Longest response.")
  flags.DEFINE_integer("batch_size", 64, "Rows per generate call.")
  flags.DEFINE_enum("prompt_style", "chat", list(rollout.PROMPT_STYLES), "How problems are asked.")
  flags.DEFINE_string("out", "", "Report path (default CHECKPOINT/eval/TASK.json).")
  flags.DEFINE_integer("seed", 0, "Problem and sampling seed.")
  app.run(main)
