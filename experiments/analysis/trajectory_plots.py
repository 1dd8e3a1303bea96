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
                "unclassified": "tab:olive", "invalid": "black"}
X_AXES = (("val_ppl", "validation perplexity (decreasing ->)"), ("flops", "training FLOPs"),
          ("step", "training step"))
GROUP_LABELS = trends.LABELS[:4]      # every label but invalid


def _positive(x, y):
  """Mask of the points a log-log panel can show, and how many finite ones it cannot (x or y
  <= 0: step 0 and its 0 FLOPs)."""
  finite = np.isfinite(x) & np.isfinite(y)
  keep = finite & (x > 0) & (y > 0)
  return keep, int((finite & ~keep).sum())


def _note_dropped(ax, dropped: int, key: str) -> None:
  """Says on the panel where points at x = 0 went (a log axis cannot show them)."""
  if dropped:
    what = "step 0" if key in ("step", "flops") else "x <= 0"
    ax.text(0.02, 0.02, f"{what} not shown (log axis)", transform=ax.transAxes, fontsize=6,
            color="0.4", va="bottom")


def _none_found(ax, text: str = "none found") -> None:
  ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
          color="0.4")


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


def _curve_panel(ax, frame, key: str, model_order: Sequence[str], colors, legend_n: bool) -> None:
  """One panel: each model's group_ppl against x = frame[key]; log axes; step 0 accounted for."""
  dropped = 0
  for i, model in enumerate(model_order):
    rows = frame[frame.model == model]
    if not len(rows):
      continue
    x, y = rows[key].to_numpy(float), rows.group_ppl.to_numpy(float)
    keep, lost = _positive(x, y)
    dropped += lost
    if keep.any():
      n = int(rows.iloc[0]["n_tokens" if "n_tokens" in rows else "n_selected"])
      ax.plot(x[keep], y[keep], marker=".", ms=3, color=colors[i % len(colors)],
              label=f"{model} (n={n})" if legend_n else model)
  if not ax.has_data():
    _none_found(ax, "no tokens")
    return
  _log_axes(ax)
  if key == "val_ppl":
    ax.invert_xaxis()
  _note_dropped(ax, dropped, key)


def plot_trend_groups(group_means, start_fraction: float, model_order: Sequence[str],
                      path_stem: str):
  """Group curve (exp(mean loss)) of each trend group against validation perplexity, FLOPs and
  steps: each size on its own tokens labelled from `start_fraction`.

  group_means: trajectories.Analysis.group_means. Rows: stagnated/upward/downward/unclassified;
  columns: the x axes that are known; one line per size; log axes.
  """
  frame = group_means[group_means.start_fraction == start_fraction]
  xs = [(key, title) for key, title in X_AXES if np.isfinite(frame[key].to_numpy(float)).any()]
  # Fixed margins: a layout engine would measure every log-axis tick label (most of the cost).
  fig, axes = plt.subplots(len(GROUP_LABELS), len(xs),
                           figsize=(4.2 * len(xs), 3.0 * len(GROUP_LABELS)), squeeze=False,
                           gridspec_kw=dict(left=0.09, right=0.98, bottom=0.06, top=0.94,
                                            wspace=0.22, hspace=0.34))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for r, label in enumerate(GROUP_LABELS):
    for c, (key, title) in enumerate(xs):
      ax = axes[r, c]
      _curve_panel(ax, frame[frame.label == label], key, model_order, colors, legend_n=True)
      ax.set_xlabel(title)
      if c == 0:
        ax.set_ylabel(f"group perplexity\n{label} tokens")
      ax.grid(True, alpha=0.3)
      if c == 0 and ax.has_data():   # one legend per row: n differs per label, not per x axis
        ax.legend(fontsize=7)
  fig.suptitle(f"Trend groups, each size on its own tokens (start fraction {start_fraction:g}); "
               f"group perplexity = exp(mean loss)")
  return save(fig, path_stem)


def plot_trend_percentages(percentages, model_order: Sequence[str], path_stem: str):
  """Figure 2: share of tokens per trend against the start fraction, one line per size; one panel
  per label (invalid only when some token is invalid)."""
  labels = [label for label in trends.LABELS
            if label != "invalid" or (percentages[percentages.label == label].percent > 0).any()]
  fig, axes = plt.subplots(1, len(labels), figsize=(3.4 * len(labels), 3.2), squeeze=False,
                           layout="constrained")
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, label in zip(axes[0], labels):
    frame = percentages[percentages.label == label]
    for i, model in enumerate(model_order):
      rows = frame[frame.model == model].sort_values("start_fraction")
      ax.plot(rows.start_fraction, rows.percent, marker="o", ms=4, color=colors[i % len(colors)],
              label=model)
    ax.set_xlabel("start fraction of training")
    ax.set_title(label)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
  axes[0, 0].set_ylabel("% of tokens")
  axes[0, 0].legend(fontsize=7)
  return save(fig, path_stem)


def plot_cross_size(cross, model_order: Sequence[str], references: Sequence[str], key: str,
                    path_stem: str):
  """Figures 3-4: per trend label a row of panels; first each size on its own tokens, then one
  panel per reference size with every size on the tokens that reference selected. x = `key`
  (val_ppl, flops or step); a dashed line at the reference's selection checkpoint, annotated
  with the share of tokens it selected.

  cross: trajectories.Analysis.cross_size.
  """
  title = dict(X_AXES)[key]
  labels = trends.TREND_LABELS
  ncol = 1 + len(references)
  fig, axes = plt.subplots(len(labels), ncol, figsize=(3.6 * ncol, 3.0 * len(labels)),
                           squeeze=False, gridspec_kw=dict(left=0.06, right=0.99, bottom=0.07,
                                                           top=0.92, wspace=0.25, hspace=0.38))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  own = cross[cross.reference_model == cross.model]
  for r, label in enumerate(labels):
    ax = axes[r, 0]
    _curve_panel(ax, own[own.label == label], key, model_order, colors, legend_n=True)
    ax.set_title(f"{label}: each size its own tokens", fontsize=8)
    ax.set_ylabel("group perplexity")
    if ax.has_data():
      ax.legend(fontsize=6)
    for c, ref in enumerate(references, start=1):
      ax = axes[r, c]
      frame = cross[(cross.reference_model == ref) & (cross.label == label)]
      _curve_panel(ax, frame, key, model_order, colors, legend_n=False)
      ax.set_title(f"{label} tokens of {ref}", fontsize=8)
      at = frame[(frame.model == ref) & (frame.step == frame.selection_step)]
      if len(at) and ax.has_data():
        x = float(at[key].iloc[0])
        if np.isfinite(x) and x > 0:
          ax.axvline(x, color="0.3", ls="--", lw=0.8)
          ax.annotate(f"{float(at.percent_selected.iloc[0]):.1f}% selected", (x, 0.97),
                      xycoords=("data", "axes fraction"), fontsize=6, ha="left", va="top")
      if c == 1 and r == 0 and ax.has_data():
        ax.legend(fontsize=6)
  for ax in axes[-1]:
    ax.set_xlabel(title)
  fraction = float(cross.selection_fraction.iloc[0]) if len(cross) else float("nan")
  fig.suptitle(f"Tokens selected after {fraction:g} of a reference size's training, followed in "
               f"every size; group perplexity = exp(mean loss)")
  return save(fig, path_stem)


def plot_double_descent(result, models, start_fraction: float, path_stem: str,
                        max_examples: int = 3):
  """The per-token detector (an extra): (a) share of upward tokens it flags per size; (b) group
  perplexity of those tokens over steps per size; (c) example trajectories, raw (thin) and
  EMA-smoothed (thick). Panels say "none found" when the detector flags nothing."""
  table = result.double_descent[result.double_descent.start_fraction == start_fraction]
  names = [m.name for m in models]
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  share = [float(table[table.model == n].fraction_of_upward.iloc[0]) for n in names]
  axes[0].bar(np.arange(len(names)), np.nan_to_num(share), color="tab:purple")
  axes[0].set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
  axes[0].set_ylabel("flagged / upward tokens")
  axes[0].set_title("(a) share of upward tokens flagged")
  if not np.nansum(share):
    _none_found(axes[0])
  dropped = 0
  for i, m in enumerate(models):
    fit = result.fits[(m.name, start_fraction)]
    rows = (fit.codes == trends.UPWARD) & result.double_descent_tokens[m.name].found
    if rows.any():
      group, _ = trajectories.group_mean_perplexity(np.asarray(m.losses)[rows],
                                                    np.zeros(int(rows.sum()), np.int8))
      steps = np.asarray(m.steps, float)
      keep, lost = _positive(steps, group[0])
      dropped += lost
      axes[1].plot(steps[keep], group[0][keep], marker=".", color=colors[i % len(colors)],
                   label=f"{m.name} (n={int(rows.sum())})")
  axes[1].set_title("(b) group perplexity of flagged tokens")
  examples = result.examples[result.examples.start_fraction == start_fraction]
  quantity, ema = result.settings["quantity"], result.settings["ema"]
  for e, (_, ex) in enumerate(examples.head(max_examples).iterrows()):
    m = models[names.index(ex.model)]
    color = colors[e % len(colors)]
    raw = trajectories.quantity_of(np.asarray(m.losses)[ex.token_index][None, :],
                                   quantity)                                     # [1, C]
    smooth = np.exp(trajectories.ema_smooth(np.log(raw), ema))[0]
    raw = raw[0]
    steps = np.asarray(m.steps, float)
    keep, _ = _positive(steps, raw)
    axes[2].plot(steps[keep], raw[keep], color=color, lw=0.8, alpha=0.6)
    axes[2].plot(steps[keep], smooth[keep], color=color, lw=2.0,
                 label=f"{m.name} #{ex.token_index} ({str(ex.context)[-25:]!r})")
  axes[2].set_title("(c) examples: raw and smoothed")
  axes[2].set_ylabel(quantity)
  axes[1].set_ylabel("group perplexity")
  for ax in axes[1:]:
    if ax.has_data():
      _log_axes(ax)
      _note_dropped(ax, dropped, "step")
      ax.legend(fontsize=6)
    else:
      _none_found(ax)
    ax.set_xlabel("training step")
    ax.grid(True, alpha=0.3)
  fig.suptitle(f"Per-token double-descent detector among upward tokens (an extra; start fraction "
               f"{start_fraction:g})")
  return save(fig, path_stem)


def plot_all(result, models, plot_dir: str) -> list[str]:
  """Every plot of the analysis into plot_dir; returns the written paths."""
  order = [m.name for m in models]
  files = plot_trend_percentages(result.percentages, order,
                                 os.path.join(plot_dir, "trend_percentages"))
  cross = result.cross_size
  for key, _ in X_AXES:
    if np.isfinite(cross[key].to_numpy(float)).any():
      files += plot_cross_size(cross, order, result.settings["reference_models"], key,
                               os.path.join(plot_dir, f"cross_size_{key}"))
  for fraction in dict.fromkeys(result.percentages.start_fraction):
    files += plot_trend_groups(result.group_means, fraction, order,
                               os.path.join(plot_dir, f"trend_groups_f{fraction:g}"))
    files += plot_double_descent(result, models, fraction,
                                 os.path.join(plot_dir, f"double_descent_f{fraction:g}"))
  return files
