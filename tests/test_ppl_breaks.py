"""The rule that flags checkpoints whose validation perplexity breaks from their neighbours
(experiments/analysis/ppl_breaks.py), on planted data, and its marks on the plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.analysis import ppl_breaks, ppl_plots

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]


def _table(planted: dict[tuple[str, int], float]) -> pd.DataFrame:
  """Two models x two corpora on a power law ppl = 500 (1 + step)^-0.4, times planted factors."""
  rows = []
  for model, params in (("small", 1e6), ("big", 1e7)):
    for corpus in ("web", "books"):
      for step in STEPS:
        ppl = 500 * (1 + step) ** -0.4 * (0.8 if model == "big" else 1.0)
        ppl *= planted.get((model, step), 1.0) if corpus == "web" else 1.0
        rows.append({"model": model, "step": step, "params": params, "tokens": step * 10,
                     "flops": 6 * params * step * 10, "corpus": corpus, "nll": math.log(ppl),
                     "ppl": ppl, "num_tokens": 100})
  # Rows out of step order: the rule sorts within each model and corpus.
  return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_planted_breaks_are_flagged_and_nothing_else():
  df = _table({("small", 64): 1.5,      # much worse than both neighbours: flagged
               ("small", 16): 1.05,     # a bump under the factor: not flagged
               ("small", 256): 0.93,    # better than its neighbours: not a break
               ("big", 1000): 1.25,     # the last checkpoint, worse than the trend before it
               ("big", 1): 3.0})        # early, but interior: flagged
  out = ppl_breaks.flag_breaks(df)
  assert list(out.columns) == list(df.columns) + ppl_breaks.BREAK_COLUMNS
  assert out.index.equals(df.index) and out["ppl"].equals(df["ppl"])
  flagged = {(r.model, r.step, r.corpus) for r in out[out.breaks_from_neighbours].itertuples()}
  assert flagged == {("small", 64, "web"), ("big", 1000, "web"), ("big", 1, "web")}
  # The ratio: ppl over the log-step interpolation of the neighbours' log-ppl (recomputed here).
  row = out[(out.model == "small") & (out.step == 64) & (out.corpus == "web")].iloc[0]
  x = np.log1p([32, 64, 128])
  w = (x[1] - x[0]) / (x[2] - x[0])
  law = lambda s: math.log(500 * (1 + s) ** -0.4)
  predicted = math.exp((1 - w) * law(32) + w * law(128))
  assert row.ppl_vs_neighbours == pytest.approx(row.ppl / predicted, rel=1e-12)
  last = out[(out.model == "big") & (out.step == 1000) & (out.corpus == "web")].iloc[0]
  prev = out[(out.model == "big") & (out.step == 512) & (out.corpus == "web")].iloc[0]
  before = out[(out.model == "big") & (out.step == 256) & (out.corpus == "web")].iloc[0]
  x = np.log1p([256, 512, 1000])
  trend = math.log(prev.ppl) + (math.log(prev.ppl) - math.log(before.ppl)) * (
      (x[2] - x[1]) / (x[1] - x[0]))
  assert last.ppl_vs_neighbours == pytest.approx(last.ppl / math.exp(trend), rel=1e-12)
  assert last.ppl < prev.ppl        # still below the previous one, yet far above the trend
  # First checkpoints get no ratio; the clean corpus has none flagged and ratios near 1.
  assert out[out.step == 0].ppl_vs_neighbours.isna().all()
  clean = out[(out.corpus == "books") & (out.step > 0)]
  assert not clean.breaks_from_neighbours.any()
  assert clean.ppl_vs_neighbours.between(0.85, 1.05).all()


def test_a_nan_perplexity_is_skipped_not_a_neighbour():
  df = _table({})
  nan_row = (df.model == "small") & (df.step == 64) & (df.corpus == "web")
  df.loc[nan_row, ["ppl", "nll"]] = np.nan
  df.loc[(df.model == "small") & (df.step == 128) & (df.corpus == "web"), "ppl"] *= 2.0
  out = ppl_breaks.flag_breaks(df)
  assert math.isnan(out[nan_row].ppl_vs_neighbours.iloc[0])
  assert not out[nan_row].breaks_from_neighbours.iloc[0]
  flagged = out[out.breaks_from_neighbours]
  assert [(r.model, r.step) for r in flagged.itertuples()] == [("small", 128)]


def test_summary_lists_the_flagged_and_the_plot_marks_them(tmp_path):
  out = ppl_breaks.flag_breaks(_table({("small", 64): 1.5}))
  md = ppl_breaks.breaks_markdown(out)
  assert "| small | 64 | web |" in md and md.count("| small |") == 1
  assert "None." in ppl_breaks.breaks_markdown(ppl_breaks.flag_breaks(_table({})))
  fig = ppl_plots.plot_ppl(out, "steps")
  crosses = [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "x"]
  assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [64]
  assert crosses[0].get_color() == "red"
  legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert legend.count("breaks from its neighbours") == 1
