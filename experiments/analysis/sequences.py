"""Sequence-level trajectories: tables, the fall-then-rise test, plots, summary (no JAX).

Input: the tidy table written by experiments/sequence_generation.py (`COLUMNS`), one row per
(scoring suite, set, model, step):
  nll   mean negative log-likelihood of the set's scored tokens, nats per token, token-weighted
        over the set's sequences (sum of NLL / number of tokens);
  ppl   exp(nll); valid_ppl: validation perplexity of that checkpoint; flops: training FLOPs.

The question of issue 6 for the small-preferred set (p_small - p_large), per model size, from its
trajectory p_0 .. p_{C-1} over checkpoints in training order:
  falls early   min(p_1 .. p_h) < (1 - tol) p_0, h = ceil((C - 1) / 2): within the first half of
                the checkpoints the perplexity drops by more than tol below where it started;
  rises later   p_{C-1} > (1 + tol) min(p), the minimum being before the last checkpoint.
The answer is "yes" when every size falls early, at least one size rises later, and the sizes that
rise are exactly the largest ones (every size larger than a rising size rises too, and the
smallest size does not). Otherwise "no", with the sizes that break the pattern named.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.analysis import figures

COLUMNS = ["scored_by", "set", "kind", "model", "params", "step", "tokens", "flops", "valid_ppl",
           "nll", "ppl", "num_tokens", "num_sequences"]
SMALL_PREFERRED = "small_minus_large"


@dataclasses.dataclass(frozen=True)
class Shape:
  """The fall/rise description of one trajectory (perplexities, not logs)."""
  model: str
  params: int
  first: float
  early_min: float
  early_min_step: int
  minimum: float
  min_step: int
  min_valid_ppl: float
  final: float
  fall: float          # 1 - early_min / first
  rise: float          # final / minimum - 1
  falls_early: bool
  rises_later: bool


def trajectory_shape(steps: Sequence[int], ppl: Sequence[float], valid_ppl: Sequence[float],
                     model: str = "", params: int = 0, tol: float = 0.05) -> Shape:
  """Shape of one trajectory; steps increasing (sorted here), at least 2 checkpoints."""
  order = np.argsort(np.asarray(steps), kind="stable")
  s = np.asarray(steps)[order]
  p = np.asarray(ppl, np.float64)[order]
  v = np.asarray(valid_ppl, np.float64)[order]
  if p.size < 2:
    raise ValueError(f"model {model!r}: a trajectory needs at least 2 checkpoints, got {p.size}")
  h = math.ceil((p.size - 1) / 2)
  e = 1 + int(np.argmin(p[1:h + 1]))
  m = int(np.argmin(p))
  fall = 1.0 - p[e] / p[0]
  rise = p[-1] / p[m] - 1.0
  return Shape(model, int(params), float(p[0]), float(p[e]), int(s[e]), float(p[m]), int(s[m]),
               float(v[m]), float(p[-1]), float(fall), float(rise), bool(fall > tol),
               bool(m < p.size - 1 and rise > tol))


def shapes(df: pd.DataFrame, set_name: str, scored_by: str | None = None, tol: float = 0.05
           ) -> list[Shape]:
  """trajectory_shape of every model (smallest first) for one set (and scoring suite)."""
  sub = df[df["set"] == set_name]
  if scored_by is not None:
    sub = sub[sub["scored_by"] == scored_by]
  if sub.empty:
    raise ValueError(f"no rows for set {set_name!r}" + (f" scored by {scored_by!r}"
                                                       if scored_by else ""))
  out = []
  for m in figures.model_order(sub):
    g = sub[sub["model"] == m]
    out.append(trajectory_shape(g["step"], g["ppl"], g["valid_ppl"], m, int(g["params"].iloc[0]),
                                tol))
  return out


@dataclasses.dataclass(frozen=True)
class Answer:
  answer: bool
  all_fall: bool
  rising: tuple[str, ...]
  not_falling: tuple[str, ...]
  pattern_breaks: tuple[str, ...]   # sizes whose rise/no-rise breaks "only the largest rise"
  text: str


def fall_then_rise_answer(shape_list: Sequence[Shape]) -> Answer:
  """Does perplexity fall early for every size and later rise for the large models only?"""
  ss = sorted(shape_list, key=lambda s: s.params)
  not_falling = tuple(s.model for s in ss if not s.falls_early)
  rising = tuple(s.model for s in ss if s.rises_later)
  first_rise = next((i for i, s in enumerate(ss) if s.rises_later), len(ss))
  breaks = tuple(s.model for s in ss[first_rise:] if not s.rises_later)
  smallest_rises = bool(ss) and ss[0].rises_later
  answer = (not not_falling and bool(rising) and not breaks and not smallest_rises)
  parts = [f"**{'Yes' if answer else 'No'}.**"]
  parts.append("Perplexity falls early for every size." if not not_falling else
               f"It does not fall early for: {', '.join(not_falling)}.")
  if not rising:
    parts.append("No size rises later.")
  else:
    parts.append(f"It rises later for: {', '.join(rising)}.")
    if smallest_rises:
      parts.append(f"The smallest size ({ss[0].model}) rises too, so the rise is not confined to "
                   "the large models.")
    if breaks:
      parts.append(f"Sizes larger than a rising size that do not rise: {', '.join(breaks)}.")
  return Answer(answer, not not_falling, rising, not_falling, breaks, " ".join(parts))


def shape_table(shape_list: Sequence[Shape]) -> str:
  """Markdown table of the shapes (perplexities to 4 significant digits)."""
  lines = ["| model | params | first | early min (step) | min (step, valid ppl) | final | "
           "fall | rise | falls early | rises later |",
           "|---|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
  for s in shape_list:
    lines.append(
        f"| {s.model} | {s.params:,} | {s.first:.4g} | {s.early_min:.4g} ({s.early_min_step}) | "
        f"{s.minimum:.4g} ({s.min_step}, {s.min_valid_ppl:.4g}) | {s.final:.4g} | "
        f"{100 * s.fall:+.1f}% | {100 * s.rise:+.1f}% | {'yes' if s.falls_early else 'no'} | "
        f"{'yes' if s.rises_later else 'no'} |")
  return "\n".join(lines)


# Plots ----------------------------------------------------------------------------------------

X_AXES = {"valid_ppl": "validation perplexity", "flops": "training FLOPs"}


def plot_sets(df: pd.DataFrame, sets: Sequence[str], x: str, title: str) -> Figure:
  """Sequence perplexity against `x` ("valid_ppl", drawn decreasing to the right as training
  goes, or "flops"), one panel per set, one line per model size; log-log axes."""
  if x not in X_AXES:
    raise ValueError(f"x={x!r}: expected one of {list(X_AXES)}")
  ncols = min(4, len(sets))
  nrows = math.ceil(len(sets) / ncols)
  fig = Figure(figsize=(3.8 * ncols, 3.2 * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  models = figures.model_order(df)
  colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
  for ax, name in zip(axes, sets):
    sub = df[df["set"] == name]
    for m in models:
      line = sub[sub["model"] == m].sort_values("step")
      line = line[(line[x] > 0) & np.isfinite(line[x])]
      if not line.empty:
        ax.plot(line[x], line["ppl"], marker="o", markersize=3, color=colors[m], label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if x == "valid_ppl":
      ax.invert_xaxis()
    ax.set_title(name, fontsize=9)
    ax.set_xlabel(X_AXES[x], fontsize=8)
    ax.set_ylabel("sequence perplexity", fontsize=8)
    ax.tick_params(labelsize=7, which="both")
    ax.grid(True, which="both", alpha=0.3)
  for ax in axes[len(sets):]:
    ax.set_visible(False)
  axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  return fig


def write_plots(df: pd.DataFrame, plot_dir: str) -> tuple[list[str], list[str]]:
  """For every scoring suite and kind of set (generated, perturbed) and x axis with data: PNG +
  PDF. Returns (files written, what was not drawn and why)."""
  os.makedirs(plot_dir, exist_ok=True)
  written, skipped = [], []
  for scored_by in dict.fromkeys(df["scored_by"]):
    sub = df[df["scored_by"] == scored_by]
    for x in X_AXES:
      values = sub[x].to_numpy(float)
      if not (np.isfinite(values) & (values > 0)).any():
        skipped.append(f"plots of {scored_by}'s sets against {X_AXES[x]} not drawn: no "
                       f"checkpoint has a positive value")
    for kind in dict.fromkeys(sub["kind"]):
      part = sub[sub["kind"] == kind]
      sets = list(dict.fromkeys(part["set"]))
      for x in X_AXES:
        values = part[x].to_numpy(float)
        if not (np.isfinite(values) & (values > 0)).any():
          continue
        fig = plot_sets(part, sets, x, f"{kind} sets scored by {scored_by}")
        # the constrained layout already fits the labels
        written += figures.save(fig, os.path.join(plot_dir, f"{scored_by}_{kind}_vs_{x}"),
                                dpi=150)
  return written, skipped


# Summary --------------------------------------------------------------------------------------

def set_overview(df: pd.DataFrame, scored_by: str) -> str:
  """Markdown: per set and model, perplexity at the first / best / last checkpoint."""
  sub = df[df["scored_by"] == scored_by]
  lines = ["| set | model | first | min (step) | final | tokens |", "|---|---|---:|---:|---:|---:|"]
  for name in dict.fromkeys(sub["set"]):
    part = sub[sub["set"] == name]
    for m in figures.model_order(part):
      g = part[part["model"] == m].sort_values("step")
      i = int(np.argmin(g["ppl"].to_numpy()))
      lines.append(f"| {name} | {m} | {g['ppl'].iloc[0]:.4g} | {g['ppl'].iloc[i]:.4g} "
                   f"({int(g['step'].iloc[i])}) | {g['ppl'].iloc[-1]:.4g} | "
                   f"{int(g['num_tokens'].iloc[0]):,} |")
  return "\n".join(lines)


def summary_markdown(df: pd.DataFrame, primary: str, info: dict, tol: float = 0.05) -> str:
  """summary.md: the answer for the small-preferred set with numbers, then every set."""
  out = ["# Sequence-level trajectories", ""]
  for k, v in info.items():
    out.append(f"- {k}: {v}")
  out += ["", "## For the small-preferred set, does perplexity fall early for every size and "
          "later rise for the large models only?", ""]
  for scored_by in dict.fromkeys(df["scored_by"]):
    if SMALL_PREFERRED not in set(df[df["scored_by"] == scored_by]["set"]):
      continue
    sh = shapes(df, SMALL_PREFERRED, scored_by, tol)
    ans = fall_then_rise_answer(sh)
    label = "" if scored_by == primary else " (across families)"
    out += [f"### Scored by {scored_by}{label}", "", ans.text, "", shape_table(sh), ""]
  out += [f"Definitions (tolerance {tol:.0%}): *falls early* = the lowest perplexity within the "
          "first half of the checkpoints is more than the tolerance below the first checkpoint's; "
          "*rises later* = the last checkpoint's perplexity is more than the tolerance above the "
          "trajectory's minimum. Perplexity = exp(token-weighted mean NLL over the set). "
          "\"Yes\" needs every size to fall early and the rising sizes to be exactly the largest "
          "ones (at least one, not the smallest).", ""]
  for scored_by in dict.fromkeys(df["scored_by"]):
    out += [f"## Every set, scored by {scored_by}", "", set_overview(df, scored_by), ""]
  return "\n".join(out)
