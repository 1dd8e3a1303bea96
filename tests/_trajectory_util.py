"""Synthetic per-token trajectories with planted trends, shared by the trajectory tests."""

from __future__ import annotations

import numpy as np

KINDS = ("stagnated", "upward", "downward", "double_descent")


def log_steps(num: int = 30, first: float = 10.0, last: float = 10000.0) -> np.ndarray:
  """[num] distinct integer steps, log-spaced from first to last."""
  steps = np.unique(np.round(np.geomspace(first, last, num)).astype(np.int64))
  assert steps.shape[0] == num, "choose a range wide enough for distinct steps"
  return steps


def planted_losses(steps, per_kind: int = 40, noise: float = 0.02, seed: int = 0):
  """Per-token losses (nats) [4 * per_kind, C] of known kinds, in the order of KINDS.

  With u = log10(step) / log10(last step) in (0, 1]:
    stagnated: constant loss 3 plus noise;
    upward: loss rises linearly in log(step) (perplexity x ~e^1 over the run);
    downward: loss falls linearly in log(step);
    double_descent: falls until u = 0.6, rises until u = 0.9 by 1.6 nats, falls 0.3 nats by the
      end; over the last 90% of steps the rise dominates, so its OLS trend is upward.
  Noise: iid normal on the loss with std `noise` nats.
  Returns (losses float32 [N, C], kinds [N] str).
  """
  rng = np.random.default_rng(seed)
  u = np.log(steps) / np.log(steps[-1])                       # [C]
  shapes = {
      "stagnated": np.full_like(u, 3.0),
      "upward": 2.0 + 1.0 * u,
      "downward": 5.0 - 2.0 * u,
      "double_descent": np.interp(u, [0.0, 0.6, 0.9, 1.0], [6.0, 2.0, 3.6, 3.3]),
  }
  losses = np.concatenate([shapes[k][None, :] + noise * rng.standard_normal((per_kind, len(u)))
                           for k in KINDS])
  kinds = np.repeat(np.asarray(KINDS), per_kind)
  return losses.astype(np.float32), kinds


# --- the paper's rule, written again from the released analysis code (never the project's) ------

# OPT-1.3B's checkpoint steps in the released code (utils.py `return_checkpoint_index`).
OPT_1_3B_STEPS = np.asarray(sorted(list(range(2000, 40000, 4000))
                                   + list(range(40000, 280000, 20000))))
PAPER_LABELS = ("stagnated", "upward", "downward", "unclassified", "invalid")


def paper_start_index(steps, fraction: float) -> int:
  """utils.py `linear_with_statistical_test`: the checkpoint nearest int(last step x fraction)."""
  steps = np.asarray(steps)
  return int(np.argmin(np.abs(steps - int(steps[-1] * fraction))))


def paper_labels(ppl, steps, fraction: float, alpha: float = 0.05):
  """Labels of the released code's rule, one statsmodels OLS per token.

  Upward / downward: OLS of ppl / ppl_start on log(step) over the kept checkpoints, slope > 0 / < 0
  with p < alpha. Stagnated (notebook `select_tokens_based_on_trend`, cond1, over the same kept
  checkpoints): neither, and with m = exp(nanmean(log x)): 0.95 < m / x_start < 1.05,
  0.95 < m / x_end < 1.05 and x.var() < m. Any non-finite kept value: invalid; else unclassified.
  Returns (labels [N] str, slope [N], pvalue [N]).
  """
  import statsmodels.api as sm  # pylint: disable=import-outside-toplevel
  first = paper_start_index(steps, fraction)
  kept = np.asarray(ppl, np.float64)[:, first:]
  x = sm.add_constant(np.log(np.asarray(steps, np.float64)[first:]))
  labels, slopes, pvalues = [], [], []
  for row in kept:
    if not np.all(np.isfinite(row)) or row[0] == 0:
      labels.append("invalid"), slopes.append(np.nan), pvalues.append(np.nan)
      continue
    res = sm.OLS(row / row[0], x).fit()
    slope, p = res.params[1], res.pvalues[1]
    m = np.exp(np.nanmean(np.log(row)))
    band = (0.95 < m / row[0] < 1.05) and (0.95 < m / row[-1] < 1.05) and row.var() < m
    label = ("upward" if p < alpha and slope > 0 else "downward" if p < alpha and slope < 0
             else "stagnated" if band else "unclassified")
    labels.append(label), slopes.append(slope), pvalues.append(p)
  return np.asarray(labels), np.asarray(slopes), np.asarray(pvalues)


def planted_band_ppl(steps, per_kind: int = 12, seed: int = 0):
  """Per-token perplexities [7 * per_kind, C] of kinds the band rule tells apart:
    flat_inside: 20 x exp(N(0, 0.01)): stagnated;
    flat_outside: 20 x (1 +- 0.15) alternating: no slope, geometric mean 14% off the start;
    noisy_level: 5000 x (1 +- 0.03) alternating: inside the band but variance above the mean;
    wavy: 60 x exp(N(0, 0.6)): large variance;
    up / down: 20 x exp(+-1.5 u) x exp(N(0, 0.003)), u = log(step) / log(last step) in (0, 1];
    nan: flat_inside with one NaN late in the run (invalid wherever the fit starts).
  Returns (ppl float64 [N, C], kinds [N] str).
  """
  rng = np.random.default_rng(seed)
  c = len(steps)
  u = np.log(np.maximum(steps, 1)) / np.log(steps[-1])
  alt = np.where(np.arange(c) % 2 == 0, 1.0, -1.0)
  noise = lambda scale: np.exp(scale * rng.standard_normal((per_kind, c)))
  kinds = {
      "flat_inside": 20.0 * noise(0.01),
      "flat_outside": 20.0 * (1 + 0.15 * alt)[None, :] * noise(0.002),
      "noisy_level": 5000.0 * (1 + 0.03 * alt)[None, :] * noise(0.002),
      "wavy": 60.0 * noise(0.6),
      "up": 20.0 * np.exp(1.5 * u)[None, :] * noise(0.003),
      "down": 20.0 * np.exp(-1.5 * u)[None, :] * noise(0.003),
  }
  nan = 20.0 * noise(0.01)
  nan[:, -2] = np.nan
  kinds["nan"] = nan
  ppl = np.concatenate(list(kinds.values()))
  return ppl, np.repeat(np.asarray(list(kinds)), per_kind)
