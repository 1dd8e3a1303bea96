"""Checkpoints whose validation perplexity breaks from their neighbours (pandas/numpy only).

The rule (`flag_breaks`), per model and corpus, checkpoints in step order, on the log-step
axis x = log(1 + step):
  * a checkpoint with a neighbour on each side is flagged when its perplexity is above both
    neighbours' AND above BREAK_FACTOR (1.1) times the perplexity its neighbours predict for it:
    exp of the straight line between their log-perplexities at its x (ratio = ppl / predicted);
  * the last checkpoint (one neighbour) is flagged when its perplexity is above BREAK_FACTOR times
    the trend of the two before it: exp of their straight line extended to its x (ratio = ppl /
    extrapolated; with only one checkpoint before it, ratio = ppl / the previous ppl);
  * the first checkpoint is never flagged (perplexity falls fastest there) and gets no ratio.
A checkpoint much better than both neighbours is not flagged, but it can make the next one look
like a break (the prediction for that one runs through it); a NaN perplexity is left out.
A flagged checkpoint usually serves the wrong weights or was saved mid-failure: check it with
`python -m tools.check_suite --deep` before reading trends through it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

BREAK_FACTOR = 1.1
BREAK_COLUMNS = ["ppl_vs_neighbours", "breaks_from_neighbours"]


def flag_breaks(df: pd.DataFrame, factor: float = BREAK_FACTOR) -> pd.DataFrame:
  """`df` (the perplexity table) with BREAK_COLUMNS added (module docstring gives the rule):
  ppl_vs_neighbours, the ratio of the checkpoint's perplexity to what its neighbours predict
  (NaN for a first checkpoint or a NaN perplexity), and breaks_from_neighbours (bool). Rows keep
  their order."""
  out = df.copy()
  ratio = pd.Series(np.nan, index=df.index)
  flagged = pd.Series(False, index=df.index)
  for _, group in df.groupby(["model", "corpus"], sort=False):
    group = group[np.isfinite(group["ppl"].to_numpy(float))].sort_values("step")
    x = np.log1p(group["step"].to_numpy(float))
    logp = np.log(group["ppl"].to_numpy(float))
    for i, idx in enumerate(group.index):
      if i == 0:
        continue
      if i == len(group) - 1:
        predicted = logp[i - 1]
        if i >= 2:
          slope = (logp[i - 1] - logp[i - 2]) / (x[i - 1] - x[i - 2])
          predicted += slope * (x[i] - x[i - 1])
        r = math.exp(logp[i] - predicted)
        flagged[idx] = r > factor
      else:
        w = (x[i] - x[i - 1]) / (x[i + 1] - x[i - 1])
        predicted = (1 - w) * logp[i - 1] + w * logp[i + 1]
        r = math.exp(logp[i] - predicted)
        flagged[idx] = r > factor and logp[i] > max(logp[i - 1], logp[i + 1])
      ratio[idx] = r
  out[BREAK_COLUMNS[0]] = ratio
  out[BREAK_COLUMNS[1]] = flagged.astype(bool)
  return out


def breaks_markdown(df: pd.DataFrame) -> str:
  """A markdown section listing the flagged rows of `flag_breaks(df)` (or saying there are none)."""
  rows = df[df[BREAK_COLUMNS[1]]] if BREAK_COLUMNS[1] in df else df.iloc[:0]
  lines = ["## Checkpoints that break from their neighbours", "",
           f"Rule: perplexity above both neighbours and above {BREAK_FACTOR} x the log-step "
           "interpolation of their log-perplexities (the last checkpoint: above "
           f"{BREAK_FACTOR} x the trend of the two before it); see "
           "experiments/analysis/ppl_breaks.py.", ""]
  if rows.empty:
    return "\n".join(lines + ["None.", ""])
  lines += ["| model | step | corpus | ppl | ppl / predicted |", "|---|---|---|---|---|"]
  lines += [f"| {r.model} | {int(r.step)} | {r.corpus} | {r.ppl:.4g} | "
            f"{getattr(r, BREAK_COLUMNS[0]):.3f} |" for r in rows.itertuples()]
  lines += ["", "Check them with `python -m tools.check_suite --suite=... --deep` (repeated or "
            "stale weights) before reading trends through them.", ""]
  return "\n".join(lines)
