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
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.analysis import figures, icl  # noqa: E402

X_TITLES = {"validation_ppl": "validation perplexity", "flops": "training FLOPs",
            "tokens": "training tokens", "step": "training steps", "params": "parameters"}
FIGURE8_XS = ("validation_ppl", "flops", "tokens", "step")   # the paper's Figure 8 panels
TASK_EMA_WEIGHT = 0.8   # the authors' smoothing of per-task curves (their notebook)


def save(fig, path_stem: str) -> list[str]:
  """Writes path_stem.png and path_stem.pdf atomically; closes the figure; returns the paths."""
  fig.tight_layout()
  paths = figures.save(fig, path_stem, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return paths


def _colors() -> list:
  return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _positive(d: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
  keep = np.isfinite(d[x].to_numpy(float)) & np.isfinite(d[y].to_numpy(float)) & (d[x] > 0)
  return d[keep]


def _lines(ax, df: pd.DataFrame, x: str, y: str, models: Sequence[str],
           smooth: float | None = None, **style) -> int:
  """One line per model along its steps (log x); with `smooth`, raw points and the authors' EMA
  line. Returns how many rows a log axis could not show (x missing or not positive)."""
  colors = _colors()
  hidden = 0
  for i, m in enumerate(models):
    d = df[df["model"] == m].sort_values("step")
    shown = _positive(d, x, y)
    hidden += len(d) - len(shown)
    if shown.empty:
      continue
    color = colors[i % len(colors)]
    if smooth is None:
      ax.plot(shown[x], shown[y], marker="o", ms=3, color=color, label=m, **style)
    else:
      ax.scatter(shown[x], shown[y], s=8, alpha=0.4, color=color)
      ax.plot(shown[x], icl.ema(shown[y], smooth), color=color, label=m, **style)
  ax.set_xscale("log")
  if x == "params":
    figures.count_axis(ax)
  return hidden


def has_data(values) -> bool:
  """Whether a column has a value a log axis can show (finite and positive)."""
  v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
  return bool((np.isfinite(v) & (v > 0)).any())


def _x_axis(ax, x: str) -> None:
  if x == "validation_ppl":
    ax.invert_xaxis()
  ax.set_xlabel(X_TITLES[x] + (" (decreasing ->)" if x == "validation_ppl" else ""))


def plot_mean_accuracy(a: icl.Analysis, path_stem: str,
                       xs: Sequence[str] = FIGURE8_XS) -> list[str]:
  """The paper's Figure 8: mean accuracy against each of `xs` (validation perplexity, FLOPs,
  training tokens, training steps), one line per size (raw points, the authors' EMA line), the
  tasks' mean random baseline dashed."""
  fig, axes = plt.subplots(1, len(xs), figsize=(4.3 * len(xs), 3.6), squeeze=False)
  models = figures.model_order(a.means)
  corr = a.correlations.set_index("x")
  chance = a.means["random_baseline"].mean()
  for ax, x in zip(axes[0], xs):
    hidden = _lines(ax, a.means, x, "accuracy", models, smooth=icl.EMA_WEIGHT)
    if np.isfinite(chance):
      ax.axhline(chance, color="gray", ls="--", lw=1, label="random")
    if x in corr.index:
      r = corr.loc[x]
      ax.set_title(f"rho={r['spearman']:.2f} [{r['spearman_lo']:.2f}, {r['spearman_hi']:.2f}]  "
                   f"R^2={r['r2']:.2f} [{r['r2_lo']:.2f}, {r['r2_hi']:.2f}]  (n={int(r['n'])})",
                   fontsize=8)
    if hidden:
      ax.text(0.02, 0.02, f"{hidden} checkpoint(s) at {X_TITLES[x]} 0 or unknown: not on this "
              f"log axis", transform=ax.transAxes, fontsize=6, color="gray")
    _x_axis(ax, x)
    ax.set_ylabel("mean accuracy")
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f"Mean accuracy over {len(a.tasks)} tasks (per-token normalised)")
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
  fig.suptitle("Correct vs incorrect options (token-weighted geometric means over tasks)")
  return save(fig, path_stem)


def plot_tasks(a: icl.Analysis, tasks: Sequence[str], path_stem: str, title: str,
               columns: int = 5, smooth: float | None = None) -> list[str]:
  """Small multiples: each task's accuracy against validation perplexity, one line per size (with
  `smooth`, raw points and the authors' EMA line), its random baseline dashed."""
  tasks = [t for t in tasks if t in set(a.results["task"])]
  if not tasks:
    return []
  rows = math.ceil(len(tasks) / columns)
  cols = min(columns, len(tasks))
  fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.3 * rows), squeeze=False)
  models = figures.model_order(a.results)
  for k, ax in enumerate(axes.flat):
    if k >= len(tasks):
      ax.axis("off")
      continue
    t = tasks[k]
    d = a.results[a.results["task"] == t]
    _lines(ax, d, "validation_ppl", "accuracy", models, smooth=smooth)
    rb = d["random_baseline"].dropna()
    if len(rb):
      ax.axhline(rb.iloc[0], color="gray", ls="--", lw=1)
    ax.invert_xaxis()
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())   # small multiples: major ticks only
    ax.set_title(t, fontsize=8)
    ax.tick_params(labelsize=7)
  axes.flat[0].legend(fontsize=6)
  fig.suptitle(title + " (accuracy vs validation perplexity, decreasing ->)")
  # A fixed grid layout: solving a tight layout over dozens of log axes takes most of a minute.
  fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=1 - 0.6 / (2.3 * rows),
                      wspace=0.35, hspace=0.55)
  paths = figures.save(fig, path_stem, dpi=120)
  plt.close(fig)
  return paths


def plot_group(a: icl.Analysis, group: str, path_stem: str) -> list[str]:
  """The paper's Figure 9 for one task group: mean accuracy (random baseline dashed) and the
  token-weighted perplexity of correct (solid) and incorrect (dashed) options against validation
  perplexity, one colour per size; raw points and the authors' EMA line."""
  g = a.groups[a.groups["group"] == group] if len(a.groups) else a.groups
  if g.empty or not has_data(g["validation_ppl"]):
    return []
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  models = figures.model_order(g)
  _lines(axes[0], g, "validation_ppl", "accuracy", models, smooth=icl.EMA_WEIGHT)
  axes[0].axhline(g["random_baseline"].mean(), color="gray", ls="--", lw=1, label="random")
  axes[0].set_ylabel("mean accuracy")
  axes[0].legend(fontsize=7)
  if g["correct_option_ppl"].notna().any():
    _lines(axes[1], g, "validation_ppl", "correct_option_ppl", models, smooth=icl.EMA_WEIGHT)
    _lines(axes[1], g, "validation_ppl", "incorrect_option_ppl", models, smooth=icl.EMA_WEIGHT,
           ls="--")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("option perplexity (solid: correct,\ndashed: incorrect)")
  else:
    axes[1].text(0.5, 0.5, "no option perplexities", ha="center", transform=axes[1].transAxes)
  for ax in axes:
    _x_axis(ax, "validation_ppl")
  tasks = a.group_tasks.get(group, [])
  fig.suptitle(f"{group.capitalize()} tasks ({len(tasks)} of the paper's group here)")
  return save(fig, path_stem)


def plot_final_option_ppl(a: icl.Analysis, path_stem: str) -> list[str]:
  """The paper's Figure 5 (right): perplexity of correct and incorrect options at each size's
  last checkpoint against parameters."""
  f = a.final_options.dropna(subset=["correct_option_ppl"])
  if f.empty:
    return []
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.plot(f["params"], f["correct_option_ppl"], "o-", label="correct options")
  ax.plot(f["params"], f["incorrect_option_ppl"], "s--", label="incorrect options")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("option perplexity (per token)")
  ax.legend(fontsize=8)
  fig.suptitle(f"Options at each size's last checkpoint ({len(a.tasks)} tasks)", fontsize=10)
  return save(fig, path_stem)


def plot_all(a: icl.Analysis, out_dir: str) -> tuple[list[str], list[str]]:
  """Every plot of the analysis that has data, under out_dir/plots/; returns (files written,
  what was not drawn and why)."""
  d = os.path.join(out_dir, "plots")
  xs = [x for x in FIGURE8_XS if has_data(a.means[x])]
  skipped = [f"plots against {X_TITLES[x]} not drawn: no checkpoint has a positive value"
             + (" (no --validation_ppl or --validation_text)" if x == "validation_ppl" else "")
             for x in FIGURE8_XS if x not in xs]
  paths = plot_mean_accuracy(a, os.path.join(d, "mean_accuracy"), xs) if xs else []
  paths += plot_final_option_ppl(a, os.path.join(d, "final_option_ppl"))
  if "validation_ppl" in xs:
    paths += plot_option_ppl(a, os.path.join(d, "option_ppl"))
    for group, tasks in a.group_tasks.items():   # summary.md says when a group has no task
      paths += plot_group(a, group, os.path.join(d, f"group_{group}"))
      paths += plot_tasks(a, tasks, os.path.join(d, f"tasks_{group}"),
                          f"The paper's {group} tasks", smooth=TASK_EMA_WEIGHT)
    paths += plot_tasks(a, a.tasks, os.path.join(d, "task_trajectories"), "Every task",
                        columns=8)
  return paths, skipped
