"""The pipeline's PNG plots (matplotlib, no display): what each stage's metrics did over its steps,
and held-out pass@1 by stage."""

from __future__ import annotations

import os

import numpy as np

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
    ("grpo.png", "grpo", "GRPO", [[("reward_accuracy", "rollout accuracy")],
                                  [("completion_length", "response length (tokens)")],
                                  [("reward", "reward")]]),
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


def pipeline_plots(workdir: str, stages: list[dict]) -> list[str]:
  """Writes DIR/plots/*.png from each finished stage's metrics and the stages' evaluations;
  returns the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
