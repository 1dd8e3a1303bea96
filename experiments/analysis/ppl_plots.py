"""Plots of validation perplexity against training steps and FLOPs (pandas + matplotlib only).

Input: the tidy table of experiments/validation_ppl.py (columns model, step, params, tokens,
flops, corpus, nll, ppl). One panel per corpus, one line per model size (ordered by parameter
count), log-log axes; checkpoints flagged by experiments/analysis/ppl_breaks.py (column
breaks_from_neighbours) are drawn as red crosses. Figures are
built with matplotlib's object API (no pyplot state) and each file is written under a temporary
name and renamed.
"""

from __future__ import annotations

import os
from typing import Sequence

import pandas as pd
from matplotlib.figure import Figure

from experiments.analysis import figures
from experiments.analysis.ppl_breaks import BREAK_COLUMNS

X_AXES = {"steps": ("step", "training steps"), "flops": ("flops", "training FLOPs")}


def plot_ppl(df: pd.DataFrame, x: str = "steps", corpora: Sequence[str] | None = None,
             title: str | None = None) -> Figure:
  """Perplexity against `x` ("steps" or "flops"), one panel per corpus, one line per model."""
  if x not in X_AXES:
    raise ValueError(f"x={x!r}: expected one of {list(X_AXES)}")
  missing = [c for c in ("model", "step", "params", "flops", "corpus", "ppl") if c not in df]
  if missing:
    raise ValueError(f"the perplexity table lacks column(s) {missing}")
  if df.empty:
    raise ValueError("the perplexity table is empty: nothing to plot")
  column, label = X_AXES[x]
  corpora = list(corpora or dict.fromkeys(df["corpus"]))
  fig, axes = figures.panel_grid(len(corpora), 3, 4.2, 3.4)
  models = figures.model_order(df)
  colors = figures.model_colors(models)
  flagged_labelled = False
  for ax, corpus in zip(axes, corpora):
    sub = df[df["corpus"] == corpus]
    for m in models:
      line = sub[sub["model"] == m].sort_values(column)
      # Step 0 (or 0 FLOPs) has no place on a log axis.
      line = line[line[column] > 0]
      if not line.empty:
        ax.plot(line[column], line["ppl"], marker="o", markersize=3, color=colors[m], label=m)
        if BREAK_COLUMNS[1] in line:
          bad = line[line[BREAK_COLUMNS[1]].astype(bool)]
          if not bad.empty:
            ax.plot(bad[column], bad["ppl"], linestyle="none", marker="x", markersize=9,
                    markeredgewidth=2, color="red", zorder=5,
                    label="breaks from its neighbours" if not flagged_labelled else None)
            flagged_labelled = True
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("validation perplexity")
    ax.set_title(corpus if len(corpora) > 1 or not title else title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    # Narrow ranges get labelled minor ticks: keep them small and slanted so they never overlap.
    ax.tick_params(axis="both", which="both", labelsize=7)
    ax.tick_params(axis="x", which="both", labelrotation=30)
  for ax in axes[len(corpora):]:
    ax.set_visible(False)
  axes[0].legend(fontsize=8, title="model")
  if title and len(corpora) > 1:
    fig.suptitle(title)
  return fig


def plot_validation_ppl(df: pd.DataFrame, out_dir: str, prefix: str = "validation_ppl"
                        ) -> list[str]:
  """Writes {prefix}_vs_steps and {prefix}_vs_flops as PNG and PDF; returns the paths."""
  paths = []
  for x in X_AXES:
    paths += figures.save(plot_ppl(df, x), os.path.join(out_dir, f"{prefix}_vs_{x}"), dpi=150,
                          bbox_inches="tight")
  return paths
