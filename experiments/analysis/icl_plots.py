"""Plots of the in-context-learning analysis (PNG and PDF); takes icl.Analysis, draws, saves.

Never imports JAX; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.analysis import figures, icl  # noqa: E402

X_TITLES = {"validation_ppl": "validation perplexity", "flops": "training FLOPs",
            "params": "parameters"}


def save(fig, path_stem: str) -> list[str]:
  """Writes path_stem.png and path_stem.pdf atomically; closes the figure; returns the paths."""
  fig.tight_layout()
  paths = figures.save(fig, path_stem, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return paths


def _lines(ax, df: pd.DataFrame, x: str, y: str, models: Sequence[str]):
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, m in enumerate(models):
    d = df[(df["model"] == m)].sort_values("step")
    keep = np.isfinite(d[x].to_numpy(float)) & np.isfinite(d[y].to_numpy(float)) & (d[x] > 0)
    if keep.any():
      ax.plot(d[x][keep], d[y][keep], marker="o", ms=3, color=colors[i % len(colors)], label=m)
  ax.set_xscale("log")
  if x == "params":
    figures.count_axis(ax)


def has_data(values) -> bool:
  """Whether a column has a value a log axis can show (finite and positive)."""
  v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
  return bool((np.isfinite(v) & (v > 0)).any())


def plot_mean_accuracy(a: icl.Analysis, path_stem: str,
                       xs: Sequence[str] = icl.X_COLUMNS) -> list[str]:
  """Mean accuracy (raw, above random) against each of `xs` (validation perplexity, FLOPs,
  parameters)."""
  ys = [y for y in ("accuracy", "accuracy_above_random") if a.means[y].notna().any()]
  fig, axes = plt.subplots(len(ys), len(xs), figsize=(4.3 * len(xs), 3.4 * len(ys)),
                           squeeze=False)
  models = figures.model_order(a.means)
  corr = a.correlations_by_metric.set_index(["y", "x"])
  for r, y in enumerate(ys):
    for c, x in enumerate(xs):
      ax = axes[r, c]
      _lines(ax, a.means, x, y, models)
      if y == "accuracy" and a.means["accuracy_above_random"].notna().any():
        chance = (a.means["accuracy"] - a.means["accuracy_above_random"]).mean()
        ax.axhline(chance, color="gray", ls="--", lw=1, label="random")
      elif y == "accuracy_above_random":
        ax.axhline(0, color="gray", ls="--", lw=1)
      if (y, x) in corr.index:
        s = corr.loc[(y, x)]
        ax.set_title(f"rho={s['spearman']:.2f}  R^2={s['r2']:.2f}  (n={int(s['n'])})", fontsize=9)
      if x == "validation_ppl":
        ax.invert_xaxis()
      ax.set_xlabel(X_TITLES[x] + (" (decreasing ->)" if x == "validation_ppl" else ""))
      ax.set_ylabel(f"mean {y.replace('_', ' ')}")
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f"Mean accuracy over {len(a.tasks)} tasks")
  return save(fig, path_stem)


def plot_option_ppl(a: icl.Analysis, path_stem: str) -> list[str]:
  """Perplexity of the correct option and (mean) of the incorrect ones against validation ppl."""
  if not a.means["correct_option_ppl"].notna().any():
    return []
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  models = figures.model_order(a.means)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  ax = axes[0]
  for i, m in enumerate(models):
    d = a.means[a.means["model"] == m].sort_values("step")
    ax.plot(d["validation_ppl"], d["correct_option_ppl"], "o-", ms=3, color=colors[i % 10],
            label=f"{m} correct")
    ax.plot(d["validation_ppl"], d["incorrect_option_ppl"], "s--", ms=3, color=colors[i % 10],
            alpha=0.6, label=f"{m} incorrect")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.invert_xaxis()
  ax.set_xlabel("validation perplexity (decreasing ->)")
  ax.set_ylabel("option perplexity (per token)")
  ax.legend(fontsize=7)
  _lines(axes[1], a.means, "validation_ppl", "log_option_ppl_gap", models)
  axes[1].invert_xaxis()
  axes[1].axhline(0, color="gray", ls="--", lw=1)
  axes[1].set_xlabel("validation perplexity (decreasing ->)")
  axes[1].set_ylabel("log(incorrect ppl / correct ppl)")
  fig.suptitle("Correct vs incorrect options (geometric means over tasks)")
  return save(fig, path_stem)


def plot_tasks(a: icl.Analysis, tasks: Sequence[str], path_stem: str, title: str,
               columns: int = 5) -> list[str]:
  """Small multiples: each task's accuracy against validation perplexity, one line per size."""
  tasks = list(tasks)
  if not tasks:
    return []
  rows = math.ceil(len(tasks) / columns)
  cols = min(columns, len(tasks))
  fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.3 * rows), squeeze=False)
  models = figures.model_order(a.results)
  scaling = a.scaling.set_index("task")
  for k, ax in enumerate(axes.flat):
    if k >= len(tasks):
      ax.axis("off")
      continue
    t = tasks[k]
    d = a.results[a.results["task"] == t]
    _lines(ax, d, "validation_ppl", "accuracy", models)
    rb = d["random_baseline"].dropna()
    if len(rb):
      ax.axhline(rb.iloc[0], color="gray", ls="--", lw=1)
    ax.invert_xaxis()
    extra = ""
    if t in scaling.index:
      extra = f"\nL={scaling.loc[t, 'linearity']:.2f} B={scaling.loc[t, 'breakthroughness']:.2f}"
    ax.set_title(t + extra, fontsize=8)
    ax.tick_params(labelsize=7)
  axes.flat[0].legend(fontsize=6)
  fig.suptitle(title + " (accuracy vs validation perplexity, decreasing ->)")
  return save(fig, path_stem)


def plot_all(a: icl.Analysis, out_dir: str) -> tuple[list[str], list[str]]:
  """Every plot of the analysis that has data, under out_dir/plots/; returns (files written,
  what was not drawn and why)."""
  d = os.path.join(out_dir, "plots")
  xs = [x for x in icl.X_COLUMNS if has_data(a.means[x])]
  skipped = [f"plots against {X_TITLES[x]} not drawn: no checkpoint has a positive value"
             + (" (no --validation_ppl or --validation_text)" if x == "validation_ppl" else "")
             for x in icl.X_COLUMNS if x not in xs]
  paths = plot_mean_accuracy(a, os.path.join(d, "mean_accuracy"), xs) if xs else []
  if "validation_ppl" in xs:
    paths += plot_option_ppl(a, os.path.join(d, "option_ppl"))
    paths += plot_tasks(a, a.top_linearity, os.path.join(d, "top_linearity"),
                        "Tasks with the highest linearity")
    paths += plot_tasks(a, a.top_breakthroughness, os.path.join(d, "top_breakthroughness"),
                        "Tasks with the highest breakthroughness")
    paths += plot_tasks(a, a.tasks, os.path.join(d, "task_trajectories"), "Every task",
                        columns=8)
  return paths, skipped
