"""Sequence level (Xia et al. 2023, section 4): tables, the two questions, plots, summary (no JAX).

Input: the tidy table written by experiments/sequence_generation.py (`COLUMNS`), one row per
(scoring suite, set, model, step):
  nll   mean negative log-likelihood of the set's scored tokens, nats per token, token-weighted
        over the set's sequences (sum of NLL / number of tokens);
  ppl   exp(nll); valid_ppl: validation perplexity of that checkpoint; flops: training FLOPs.
Generated sets are named `<configuration>_<method>` (`ps-pl_greedy`, `pl_nucleus`, ...),
corrupted ones `clean` and `replace_<rate>`.

The paper's two questions, for the p_s - p_l sets (`INVERSE`) of each decoding method:
1. At the final checkpoints (`final_table`: each size's last checkpoint), does the perplexity of
   p_s - p_l rise with model size (inverse scaling) while the human text (`clean`) and p_l fall?
   `scaling_answer`: "rises" = the largest size's perplexity is above the smallest's, "falls" =
   below; whether every step between consecutive sizes goes the same way is said too.
2. Along training, does every size first lower the perplexity of p_s - p_l, and do the larger
   sizes later raise it? Per model size, from its trajectory p_0 .. p_{C-1} in training order:
     falls early   min(p_1 .. p_h) < (1 - tol) p_0, h = ceil((C - 1) / 2): within the first half of
                   the checkpoints the perplexity drops by more than tol below where it started;
     rises later   p_{C-1} > (1 + tol) min(p), the minimum being before the last checkpoint.
   The answer is "yes" when every size falls early, at least one size rises later, and the sizes
   that rise are exactly the largest ones (every size larger than a rising size rises too, and
   the smallest size does not). Otherwise "no", with the sizes that break the pattern named.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.analysis import figures

COLUMNS = ["scored_by", "set", "kind", "model", "params", "step", "tokens", "flops", "valid_ppl",
           "nll", "ppl", "num_tokens", "num_sequences"]
FINAL_COLUMNS = ["scored_by", "set", "kind", "configuration", "method", "model", "params", "step",
                 "ppl", "nll", "num_tokens"]
METHODS = ("greedy", "nucleus")
INVERSE = "ps-pl"              # p_s - p_l: the configuration of the inverse-scaling question
LARGE = "pl"                   # p_l alone
CLEAN = "clean"                # the human text
SMALL_PREFERRED = f"{INVERSE}_greedy"


def split_name(name: str) -> tuple[str, str]:
  """`ps-pl_greedy` -> ("ps-pl", "greedy"); a set of no decoding method -> (name, "")."""
  base, _, method = name.rpartition("_")
  return (base, method) if base and method in METHODS else (name, "")


def corruption_rate(name: str) -> float | None:
  """`clean` -> 0.0, `replace_0.4` -> 0.4, any other set -> None."""
  if name == CLEAN:
    return 0.0
  if name.startswith("replace_"):
    try:
      return float(name[len("replace_"):])
    except ValueError:
      return None
  return None


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
  fig, axes = figures.panel_grid(len(sets), 4, 3.8, 3.2)
  models = figures.model_order(df)
  colors = figures.model_colors(models)
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
  """For every scoring suite: the final-checkpoint scaling plot (`plot_final`,
  <suite>_final_vs_params), and per kind of set (generated, perturbed) and x axis with data the
  trajectories (`plot_sets`). PNG + PDF. Returns (files written, what was not drawn and why)."""
  os.makedirs(plot_dir, exist_ok=True)
  written, skipped = [], []
  final = final_table(df)
  for scored_by in dict.fromkeys(df["scored_by"]):
    fig = plot_final(final[final["scored_by"] == scored_by], f"final checkpoints scored by "
                     f"{scored_by}")
    written += figures.save(fig, os.path.join(plot_dir, f"{scored_by}_final_vs_params"), dpi=150)
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


# The final checkpoints ------------------------------------------------------------------------

def final_table(df: pd.DataFrame) -> pd.DataFrame:
  """The scaling table (FINAL_COLUMNS): per scoring suite, set and model, the row of the model's
  last checkpoint; configuration and method parsed from the set's name."""
  last = df.groupby(["scored_by", "model"])["step"].transform("max")
  out = df[df["step"] == last].copy()
  parts = [split_name(n) for n in out["set"]]
  out["configuration"] = [p[0] for p in parts]
  out["method"] = [p[1] for p in parts]
  scorers = {b: i for i, b in enumerate(dict.fromkeys(df["scored_by"]))}
  sizes = {m: i for i, m in enumerate(figures.model_order(df))}
  rank = out["scored_by"].map(scorers) * (len(sizes) + 1) + out["model"].map(sizes)
  out = out.iloc[np.argsort(rank.to_numpy(), kind="stable")]
  return out[FINAL_COLUMNS].reset_index(drop=True)


def _short(n: float) -> str:
  """29504 -> "29.5K", 125e6 -> "125M", 1.3e9 -> "1.3B"."""
  for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if n >= div:
      return f"{n / div:.3g}{unit}"
  return f"{n:g}"


def _param_axis(ax, sizes: dict[int, str]) -> None:
  """Log x axis with one tick per model size, labelled with its name (no overlapping labels)."""
  ax.set_xscale("log")
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ticks = sorted(sizes)
  ax.set_xticks(ticks)
  ax.set_xticklabels([f"{sizes[t]}\n{_short(t)}" for t in ticks], fontsize=7)
  if len(ticks) > 1:
    pad = (np.log(ticks[-1]) - np.log(ticks[0])) * 0.08
    ax.set_xlim(np.exp(np.log(ticks[0]) - pad), np.exp(np.log(ticks[-1]) + pad))


def plot_final(final: pd.DataFrame, title: str) -> Figure:
  """Perplexity at the final checkpoints against parameters (log-log), one scoring suite: one
  panel per decoding method with one line per configuration (the paper's Figure 6 row 1; its
  Figure 7 for another family's checkpoints), the human text dashed; and one panel of the
  corruption rates, one line per rate (Figure 5 left)."""
  methods = [m for m in METHODS if (final["method"] == m).any()]
  rates = {n: r for n in dict.fromkeys(final["set"]) if (r := corruption_rate(n)) is not None}
  panels = [("method", m) for m in methods] + ([("corruption", None)] if rates else [])
  if not panels:
    panels = [("other", None)]
  fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
  axes = fig.subplots(1, len(panels), squeeze=False).ravel()
  sizes = dict(zip(final["params"], final["model"]))

  def line(ax, name, **kw):
    g = final[final["set"] == name].sort_values("params")
    g = g[np.isfinite(g["ppl"])]
    if not g.empty:
      ax.plot(g["params"], g["ppl"], marker="o", markersize=4, **kw)

  for ax, (kind, what) in zip(axes, panels):
    if kind == "method":
      configs = dict.fromkeys(final[final["method"] == what]["configuration"])
      for i, c in enumerate(configs):
        line(ax, f"{c}_{what}", color=f"C{i % 10}", label=c, lw=2.2 if c == INVERSE else 1.2)
      line(ax, CLEAN, color="black", ls="--", label="human text")
      ax.set_title(f"generated, {what}", fontsize=9)
    elif kind == "corruption":
      cmap = matplotlib.colormaps["viridis"]
      for name, rate in sorted(rates.items(), key=lambda kv: kv[1]):
        line(ax, name, color=cmap(rate * 0.9),
             label="clean" if rate == 0 else f"{rate:.0%} replaced")
      ax.set_title("corrupted text", fontsize=9)
    else:
      for i, name in enumerate(dict.fromkeys(final["set"])):
        line(ax, name, color=f"C{i % 10}", label=name)
    ax.set_yscale("log")
    _param_axis(ax, sizes)
    ax.set_xlabel("parameters", fontsize=8)
    ax.set_ylabel("perplexity at the final checkpoint", fontsize=8)
    ax.tick_params(axis="y", labelsize=7, which="both")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
  fig.suptitle(title, fontsize=10)
  return fig


@dataclasses.dataclass(frozen=True)
class ScalingAnswer:
  answer: bool | None             # None: the p_s - p_l set is missing
  inverse: tuple[float, ...]      # p_s - p_l perplexity per size, smallest first
  clean: tuple[float, ...]
  large: tuple[float, ...]
  models: tuple[str, ...]
  text: str


def _trend(values: Sequence[float]) -> tuple[float, bool, bool]:
  """(ratio largest / smallest, rises at every step, falls at every step)."""
  v = np.asarray(values, np.float64)
  d = np.diff(v)
  return float(v[-1] / v[0]), bool((d > 0).all()), bool((d < 0).all())


def scaling_answer(final: pd.DataFrame, scored_by: str, method: str) -> ScalingAnswer:
  """Question 1 (module docstring) for one scoring suite and decoding method."""
  sub = final[final["scored_by"] == scored_by]
  models = figures.model_order(sub)
  get = lambda name: tuple(float(sub[(sub["set"] == name) & (sub["model"] == m)]["ppl"].iloc[0])
                           if ((sub["set"] == name) & (sub["model"] == m)).any()
                           else float("nan") for m in models)
  inv, clean, large = get(f"{INVERSE}_{method}"), get(CLEAN), get(f"{LARGE}_{method}")
  if len(models) < 2 or not np.isfinite(inv).all():
    return ScalingAnswer(None, inv, clean, large, tuple(models),
                         f"Not answered: the {INVERSE}_{method} set needs a perplexity at the "
                         "final checkpoint of at least two sizes.")
  fmt = lambda v: " -> ".join(f"{x:.4g}" for x in v)
  ratio, up, _ = _trend(inv)
  rises = ratio > 1
  parts = [f"{INVERSE}_{method} (p_s - p_l): {fmt(inv)} "
           f"({'rises' if rises else 'does not rise'}, x{ratio:.3g} from {models[0]} to "
           f"{models[-1]}{', at every size' if up and len(models) > 2 else ''})"]
  falls = []
  for label, values in (("human text", clean), (f"{LARGE}_{method} (p_l)", large)):
    if not np.isfinite(values).all():
      parts.append(f"{label}: not scored")
      continue
    r, _, down = _trend(values)
    falls.append(r < 1)
    parts.append(f"{label}: {fmt(values)} ({'falls' if r < 1 else 'does not fall'}, x{r:.3g}"
                 f"{', at every size' if down and len(models) > 2 else ''})")
  answer = rises and bool(falls) and all(falls)
  text = (f"**{'Yes' if answer else 'No'}.** Perplexity at the final checkpoints of "
          f"{', '.join(models)}: " + "; ".join(parts) + ".")
  return ScalingAnswer(answer, inv, clean, large, tuple(models), text)


def final_overview(final: pd.DataFrame, scored_by: str) -> str:
  """Markdown: set x model perplexity at the final checkpoints of one scoring suite."""
  sub = final[final["scored_by"] == scored_by]
  models = figures.model_order(sub)
  lines = ["| set | " + " | ".join(f"{m} ({int(sub[sub['model'] == m]['params'].iloc[0]):,})"
                                   for m in models) + " |",
           "|---|" + "---:|" * len(models)]
  for name in dict.fromkeys(sub["set"]):
    cells = []
    for m in models:
      g = sub[(sub["set"] == name) & (sub["model"] == m)]
      cells.append(f"{g['ppl'].iloc[0]:.4g}" if len(g) else "")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


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


def _methods(df: pd.DataFrame) -> list[str]:
  names = set(df["set"])
  return [m for m in METHODS if f"{INVERSE}_{m}" in names]


def headline(df: pd.DataFrame, primary: str, tol: float = 0.05) -> str:
  """One line for the closing summary: both answers, per method, for the primary suite."""
  sub = df[df["scored_by"] == primary]
  final = final_table(sub)
  parts = []
  for m in _methods(sub):
    q1 = scaling_answer(final, primary, m)
    q2 = fall_then_rise_answer(shapes(sub, f"{INVERSE}_{m}", primary, tol))
    word = lambda a: "n/a" if a is None else ("yes" if a else "no")
    arrow = lambda v: (" -> ".join(f"{x:.4g}" for x in v) if np.isfinite(v).all()
                       else "not scored")
    parts.append(f"{m}: at the final checkpoints p_s - p_l {arrow(q1.inverse)}, human text "
                 f"{arrow(q1.clean)}, p_l {arrow(q1.large)} (inverse scaling with the human "
                 f"text and p_l falling: {word(q1.answer)}); along training every size falls "
                 f"and the larger rise: {word(q2.answer)}")
  return ("smallest -> largest size: " + "; ".join(parts)) if parts else (
      f"no {INVERSE} set decoded: the paper's questions are not answered")


def summary_markdown(df: pd.DataFrame, primary: str, info: dict, tol: float = 0.05) -> str:
  """summary.md: the paper's two questions answered with numbers, per scoring suite and decoding
  method, then the final-checkpoint table and every set's trajectory overview."""
  out = ["# Sequence level", ""]
  for k, v in info.items():
    out.append(f"- {k}: {v}")
  final = final_table(df)
  scorers = list(dict.fromkeys(df["scored_by"]))
  label = lambda b: "" if b == primary else " (another family's checkpoints, Figure 7)"
  out += ["", "## 1. At the final checkpoints, does the perplexity of p_s - p_l rise with model "
          "size (inverse scaling) while the human text and p_l fall?", ""]
  for b in scorers:
    for m in _methods(df[df["scored_by"] == b]):
      out += [f"### Scored by {b}{label(b)}, {m}", "", scaling_answer(final, b, m).text, ""]
  out += ["*Rises* / *falls*: the largest size's perplexity is above / below the smallest's; "
          "\"at every size\" when each larger size moves the same way. \"Yes\" needs p_s - p_l to "
          "rise and the human text and p_l to fall.", ""]
  out += ["## 2. Along training, does every size first lower the perplexity of p_s - p_l, and do "
          "the larger sizes later raise it?", ""]
  for b in scorers:
    for m in _methods(df[df["scored_by"] == b]):
      sh = shapes(df, f"{INVERSE}_{m}", b, tol)
      out += [f"### Scored by {b}{label(b)}, {m}", "", fall_then_rise_answer(sh).text, "",
              shape_table(sh), ""]
  out += [f"Definitions (tolerance {tol:.0%}): *falls early* = the lowest perplexity within the "
          "first half of the checkpoints is more than the tolerance below the first checkpoint's; "
          "*rises later* = the last checkpoint's perplexity is more than the tolerance above the "
          "trajectory's minimum. Perplexity = exp(token-weighted mean NLL over the set). "
          "\"Yes\" needs every size to fall early and the rising sizes to be exactly the largest "
          "ones (at least one, not the smallest).", ""]
  for b in scorers:
    out += [f"## Perplexity at the final checkpoints, scored by {b}{label(b)}", "",
            final_overview(final, b), ""]
  for b in scorers:
    out += [f"## Every set along training, scored by {b}", "", set_overview(df, b), ""]
  return "\n".join(out)
