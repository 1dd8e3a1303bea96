"""Plots of the token-trajectory analysis (PNG and PDF); takes trajectories.Analysis, draws, saves.

Never imports JAX; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from matplotlib import ticker  # noqa: E402

from experiments.analysis import figures, trajectories, trends  # noqa: E402

LABEL_COLORS = {"stagnated": "tab:gray", "upward": "tab:red", "downward": "tab:blue",
                "invalid": "black"}
X_AXES = (("step", "training step"), ("flops", "training FLOPs"),
          ("val_ppl", "validation perplexity (decreasing ->)"))


def _log_axes(ax, x: bool = True) -> None:
  """Log axes (call after plotting) with few tick labels: decades on a wide axis (10^k from 1e5
  up), 1-2-5 in plain text on an axis of under two decades, minor ticks labelled only below one
  decade. Matplotlib's default mathtext labels on every minor tick make drawing several times
  slower."""
  plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
  for axis, scale, limits in ((ax.yaxis, ax.set_yscale, ax.get_ylim),) + (
      ((ax.xaxis, ax.set_xscale, ax.get_xlim),) if x else ()):
    lo, hi = sorted(limits())
    scale("log")
    decades = np.log10(hi / lo) if lo > 0 else np.inf
    wide = decades >= 2
    axis.set_major_locator(ticker.LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.LogFormatterSciNotation() if wide and hi >= 1e5 else plain)
    axis.set_minor_formatter(plain if decades < 1 else ticker.NullFormatter())


def save(fig, path_stem: str) -> list[str]:
  """Writes path_stem.png and path_stem.pdf atomically; closes the figure; returns the paths."""
  paths = figures.save(fig, path_stem, dpi=100)   # constrained layout already fits the labels
  plt.close(fig)
  return paths


def plot_trend_groups(group_means, start_fraction: float, model_order: Sequence[str], path_stem: str):
  """Mean per-token perplexity of each trend group against steps, FLOPs and validation perplexity.

  group_means: trajectories.Analysis.group_means. Rows: stagnated/upward/downward; columns: the
  x axes that are known; one line per size; log axes.
  """
  frame = group_means[group_means.start_fraction == start_fraction]
  xs = [(key, title) for key, title in X_AXES if np.isfinite(frame[key].to_numpy(float)).any()]
  labels = trends.LABELS[:3]
  # Fixed margins: a layout engine would measure every log-axis tick label (most of the cost).
  fig, axes = plt.subplots(len(labels), len(xs), figsize=(4.2 * len(xs), 3.2 * len(labels)),
                           squeeze=False, gridspec_kw=dict(left=0.09, right=0.98, bottom=0.07,
                                                           top=0.93, wspace=0.22, hspace=0.32))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for r, label in enumerate(labels):
    for c, (key, title) in enumerate(xs):
      ax = axes[r, c]
      for i, model in enumerate(model_order):
        rows = frame[(frame.model == model) & (frame.label == label)]
        x, y = rows[key].to_numpy(float), rows.mean_ppl.to_numpy(float)
        keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        if keep.any():
          n = int(rows.n_tokens.iloc[0])
          ax.plot(x[keep], y[keep], marker=".", color=colors[i % len(colors)],
                  label=f"{model} (n={n})")
      _log_axes(ax)
      if key == "val_ppl":
        ax.invert_xaxis()
      ax.set_xlabel(title)
      if c == 0:
        ax.set_ylabel(f"mean perplexity\n{label} tokens")
      ax.grid(True, alpha=0.3)
      if c == 0 and ax.has_data():   # one legend per row: n differs per label, not per x axis
        ax.legend(fontsize=7)
  fig.suptitle(f"Trend groups (start fraction {start_fraction:g})")
  return save(fig, path_stem)


def plot_trend_percentages(percentages, model_order: Sequence[str], path_stem: str):
  """Grouped bars: percentage of tokens per trend for each size, one panel per start fraction."""
  fractions = list(dict.fromkeys(percentages.start_fraction))
  fig, axes = plt.subplots(1, len(fractions), figsize=(4.5 * len(fractions), 3.5), squeeze=False,
                           layout="constrained")
  width = 0.8 / len(trends.LABELS)
  for ax, fraction in zip(axes[0], fractions):
    frame = percentages[percentages.start_fraction == fraction]
    for k, label in enumerate(trends.LABELS):
      heights = [float(frame[(frame.model == m) & (frame.label == label)].percent.sum())
                 for m in model_order]
      ax.bar(np.arange(len(model_order)) + (k - 1.5) * width, heights, width, label=label,
             color=LABEL_COLORS[label])
    ax.set_xticks(np.arange(len(model_order)), model_order, rotation=30, ha="right")
    ax.set_ylabel("% of tokens")
    ax.set_title(f"start fraction {fraction:g}")
    ax.legend(fontsize=7)
  return save(fig, path_stem)


def plot_double_descent(result, models, start_fraction: float, path_stem: str, max_examples: int = 3):
  """(a) share of upward tokens showing double descent per size; (b) mean perplexity of those
  tokens over steps per size; (c) example trajectories, raw (thin) and EMA-smoothed (thick)."""
  table = result.double_descent[result.double_descent.start_fraction == start_fraction]
  names = [m.name for m in models]
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  share = [float(table[table.model == n].fraction_of_upward.iloc[0]) for n in names]
  axes[0].bar(np.arange(len(names)), np.nan_to_num(share), color="tab:purple")
  axes[0].set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
  axes[0].set_ylabel("double descent / upward tokens")
  axes[0].set_title("(a) double-descent share")
  for i, m in enumerate(models):
    fit = result.fits[(m.name, start_fraction)]
    rows = (fit.codes == trends.UPWARD) & result.double_descent_tokens[m.name].found
    if rows.any():
      ppl = np.exp(np.asarray(m.losses, np.float64)[rows]).mean(0)
      axes[1].plot(m.steps, ppl, marker=".", color=colors[i % len(colors)],
                   label=f"{m.name} (n={int(rows.sum())})")
  axes[1].set_title("(b) mean perplexity of double-descent tokens")
  examples = result.examples[result.examples.start_fraction == start_fraction]
  quantity, ema = result.settings["quantity"], result.settings["ema"]
  for e, (_, ex) in enumerate(examples.head(max_examples).iterrows()):
    m = models[names.index(ex.model)]
    color = colors[e % len(colors)]
    raw = trajectories.quantity_of(np.asarray(m.losses)[ex.token_index][None, :],
                                   quantity)                                     # [1, C]
    smooth = np.exp(trajectories.ema_smooth(np.log(raw), ema))[0]
    raw = raw[0]
    axes[2].plot(m.steps, raw, color=color, lw=0.8, alpha=0.6)
    axes[2].plot(m.steps, smooth, color=color, lw=2.0,
                 label=f"{m.name} #{ex.token_index} ({str(ex.context)[-25:]!r})")
  axes[2].set_title("(c) examples: raw and smoothed")
  axes[2].set_ylabel(quantity)
  axes[1].set_ylabel("perplexity")
  for ax in axes[1:]:
    _log_axes(ax)
    ax.set_xlabel("training step")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize=6)
  fig.suptitle(f"Double descent among upward tokens (start fraction {start_fraction:g})")
  return save(fig, path_stem)


def plot_all(result, models, plot_dir: str) -> list[str]:
  """Every plot of the analysis into plot_dir; returns the written paths."""
  order = [m.name for m in models]
  files = plot_trend_percentages(result.percentages, order,
                                 os.path.join(plot_dir, "trend_percentages"))
  for fraction in dict.fromkeys(result.percentages.start_fraction):
    files += plot_trend_groups(result.group_means, fraction, order,
                               os.path.join(plot_dir, f"trend_groups_f{fraction:g}"))
    files += plot_double_descent(result, models, fraction,
                                 os.path.join(plot_dir, f"double_descent_f{fraction:g}"))
  return files
