"""PNG plots (matplotlib, no display): what each pipeline stage's metrics did over its steps,
held-out pass@1 by stage, and RLHF's proxy against gold reward (over-optimisation)."""

from __future__ import annotations

import os

import numpy as np

from posttrain.tasks import BUILTIN, DATA_FORMATS

# (file name, stage, title, [(metric, label), ...] per panel); panels share the step axis.
_CURVES = (
    ("pretrain_loss.png", "base", "Pre-training", [[("loss", "train loss"),
                                                     ("eval_loss", "held-out loss")]]),
    ("expert_balance.png", "base", "Expert load over pre-training",
     [[("expert_load_max_over_mean", "max / mean"), ("expert_load_min_over_mean", "min / mean")],
      [("expert_load_cv", "coefficient of variation")]]),
    ("sft_loss.png", "sft", "SFT", [[("loss", "train loss"), ("eval_loss", "held-out loss")]]),
    ("reward_model.png", "reward_model", "Reward model",
     [[("accuracy", "pairwise accuracy"), ("eval_accuracy", "held-out accuracy")],
      [("margin", "reward margin"), ("eval_margin", "held-out margin")]]),
    ("dpo_margins.png", "dpo", "DPO",
     [[("margin", "implicit reward margin"), ("eval_margin", "held-out margin")],
      [("accuracy", "preference accuracy"), ("eval_accuracy", "held-out accuracy")]]),
    ("grpo.png", "grpo", "GRPO",
     [[("reward_accuracy", "rollout accuracy (sampled, train problems)")]
      + [(f"eval_{t}_pass_at_1", f"held-out greedy pass@1: {t}")
         for t in (*BUILTIN, *DATA_FORMATS)],
      [("completion_length", "response length (tokens)")],
      [("reward", "reward (weighted total)"), ("reward_steps", "steps reward")]]),
)


def _curve_plot(plt, rows: list[dict], title: str, panels, out: str) -> bool:
  """One figure with a panel per metric group; False (nothing written) when no metric is logged."""
  panels = [[(m, label) for m, label in panel if any(m in r for r in rows)] for panel in panels]
  panels = [p for p in panels if p]
  if not panels:
    return False
  fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.6 * len(panels)), sharex=True,
                           squeeze=False)
  for ax, panel in zip(axes[:, 0], panels):
    for metric, label in panel:
      points = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
      ax.plot(*zip(*points), marker="o" if len(points) < 12 else None, label=label)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  axes[0, 0].set_title(title)
  axes[-1, 0].set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return True


def _pass_at_1_plot(plt, stages: list[dict], out: str) -> bool:
  """Grouped bars: held-out greedy pass@1 per task family (groups) and stage (bars)."""
  policy = [s for s in stages if s["stage"] != "reward_model"]
  if not policy:
    return False
  tasks = list(policy[0]["eval"])
  width = 0.8 / len(policy)
  fig, ax = plt.subplots(figsize=(6, 3.2))
  for i, s in enumerate(policy):
    values = [s["eval"][t]["pass_at_1"] for t in tasks]
    ax.bar(np.arange(len(tasks)) + i * width, values, width, label=s["stage"])
  ax.set_xticks(np.arange(len(tasks)) + width * (len(policy) - 1) / 2, tasks)
  ax.set_ylim(0, 1)
  ax.set_ylabel("held-out greedy pass@1")
  ax.set_title("pass@1 by stage")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return True


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def stage_plot(workdir: str, stage: str) -> str | None:
  """DIR/<the stage's plot>.png (e.g. grpo.png) from DIR/metrics.jsonl; None when the stage has
  no plot or logged none of its metrics."""
  from train.metrics import read_metrics
  for name, kind, title, panels in _CURVES:
    if kind == stage:
      out = os.path.join(workdir, name)
      return out if _curve_plot(_pyplot(), read_metrics(workdir), title, panels, out) else None
  return None


def pipeline_plots(workdir: str, stages: list[dict]) -> list[str]:
  """Writes DIR/plots/*.png from each finished stage's metrics and the stages' evaluations;
  returns the paths written."""
  plt = _pyplot()
  from train.metrics import read_metrics
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  workdirs = {s["stage"]: s["workdir"] for s in stages}
  for name, stage, title, panels in _CURVES:
    if stage in workdirs:
      out = os.path.join(out_dir, name)
      if _curve_plot(plt, read_metrics(workdirs[stage]), title, panels, out):
        paths.append(out)
  out = os.path.join(out_dir, "pass_at_1.png")
  if _pass_at_1_plot(plt, stages, out):
    paths.append(out)
  return paths


def overoptimisation_plot(workdir: str) -> str | None:
  """DIR/overoptimisation.png of an RL run against a reward model: the proxy reward (the reward
  model's, `reward_reward_model`) and the gold reward (the verifier's, `reward_accuracy`) over
  steps and against the KL to the reference (PPO's `kl_rollout`, else GRPO's `kl`). None when
  the run logged no proxy and gold rewards."""
  plt = _pyplot()
  from train.metrics import read_metrics
  rows = [r for r in read_metrics(workdir)
          if "reward_reward_model" in r and "reward_accuracy" in r]
  if not rows:
    return None
  steps = [r["step"] for r in rows]
  kl = [r.get("kl_rollout", r.get("kl", float("nan"))) for r in rows]
  fig, axes = plt.subplots(2, 1, figsize=(6, 5.6))
  # Over steps as lines; against KL (not monotonic in steps) as points.
  for ax, x, label, line in ((axes[0], steps, "step", "-"), (axes[1], kl, "KL to the reference",
                                                             "none")):
    ax.plot(x, [r["reward_reward_model"] for r in rows], marker="o", linestyle=line,
            color="tab:blue", label="proxy: reward model")
    gold = ax.twinx()
    gold.plot(x, [r["reward_accuracy"] for r in rows], marker="s", linestyle=line,
              color="tab:red", label="gold: verifier accuracy")
    ax.set_xlabel(label)
    ax.set_ylabel("proxy reward", color="tab:blue")
    gold.set_ylabel("gold reward", color="tab:red")
    ax.grid(alpha=0.3)
  axes[0].set_title("Reward-model over-optimisation")
  fig.tight_layout()
  out = os.path.join(workdir, "overoptimisation.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
