"""Per-token trend labels as Xia et al. (2023), section 3, and their released analysis code
define them.

Vectorised over tokens; for each token's trajectory v (perplexity by default) over the checkpoints:

  1. keep the checkpoints from the one whose step is nearest `start_fraction * steps[-1]` (the
     earlier one on a tie) to the last (utils.py `linear_with_statistical_test`);
  2. divide each token's trajectory by its first kept value: y_t = v_t / v_start;
  3. fit y = a + b * log(step) by ordinary least squares over the n kept checkpoints;
  4. two-sided t-test of b = 0 with n - 2 degrees of freedom:
       Sxx = sum (x - mean x)^2,  b = sum (x - mean x)(y - mean y) / Sxx,  a = mean y - b mean x,
       s^2 = sum (y - a - b x)^2 / (n - 2),  se(b) = sqrt(s^2 / Sxx),  t = b / se(b),
       p = 2 * P(T_{n-2} > |t|)   (the formulas statsmodels' OLS uses; tests compare the two);
  5. the stagnation band over the same kept checkpoints (notebook `select_tokens_based_on_trend`,
     cond1): with G = exp(mean log v) (the geometric mean of the kept values),
       1 - band < G / v_start < 1 + band,  1 - band < G / v_end < 1 + band,  var(v) < G
     (var with ddof 0, band = 0.05).

Labels: `upward` if p < alpha and b > 0; `downward` if p < alpha and b < 0; `stagnated` if neither
and the band holds; `unclassified` for every other token with finite values (no significant slope
but outside the band or too variable: the paper's "wavy series ... eliminated"); `invalid` if any
kept value is non-finite or the first kept value is 0 (the normalisation is undefined). Invalid
tokens have NaN slope, intercept, stderr, p-value and band statistics and are counted.

The released notebook slices the band's window by checkpoint count (`int(f * num_checkpoints)`),
not by step as its regression does; here both use the regression's kept checkpoints, so a label
is one rule over one window.

Degenerate fits (documented choice, the t statistic is 0/0 or b/0 there): a trajectory that the line
fits exactly (residual sum of squares exactly 0) gets se(b) = 0 and
  * b == 0 (e.g. a constant trajectory): t = 0, p = 1 -> stagnated (a constant is inside the band);
  * b != 0: t = +-inf, p = 0 -> upward / downward.

Steps must be >= 0 and strictly increasing; step 0 (a real suite's initialisation) may be among
the checkpoints but not among the kept ones, since the fit uses log(step).

Pure numpy/scipy: never imports JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import special

LABELS = ("stagnated", "upward", "downward", "unclassified", "invalid")
STAGNATED, UPWARD, DOWNWARD, UNCLASSIFIED, INVALID = range(5)
TREND_LABELS = LABELS[:3]      # the paper's three groups
BAND = 0.05                    # the stagnation band: +-5% of the geometric mean

# Rows per block: bounds the float64 temporaries ([block, n] arrays) and keeps them in cache
# (4096 rows measured ~3x faster than 65536 on 20k x 40).
_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class TrendFit:
  """Per-token trend of one model's trajectories over the kept checkpoints.

  codes, slope, intercept, stderr, pvalue: [num_tokens]; codes index LABELS (int8);
  slope/intercept are in units of the normalised trajectory per unit log(step) (dimensionless).
  gmean_over_start, gmean_over_end, variance_over_gmean: [num_tokens] the band statistics
  G / v_start, G / v_end and var(v) / G (module docstring); NaN for invalid tokens.
  steps: [n] the kept steps; columns: [n] their indices in the steps given to classify_trends.
  """

  codes: np.ndarray
  slope: np.ndarray
  intercept: np.ndarray
  stderr: np.ndarray
  pvalue: np.ndarray
  gmean_over_start: np.ndarray
  gmean_over_end: np.ndarray
  variance_over_gmean: np.ndarray
  steps: np.ndarray
  columns: np.ndarray
  alpha: float
  band: float = BAND
  start_fraction: float | None = None

  @property
  def labels(self) -> np.ndarray:
    """[num_tokens] label strings."""
    return np.asarray(LABELS)[self.codes]

  @property
  def num_invalid(self) -> int:
    return int(np.sum(self.codes == INVALID))

  def counts(self) -> dict[str, int]:
    """Tokens per label, every label present (0 when empty)."""
    counts = np.bincount(self.codes, minlength=len(LABELS))
    return {label: int(c) for label, c in zip(LABELS, counts)}

  def to_frame(self) -> pd.DataFrame:
    """One row per token: label, slope, intercept, stderr, pvalue and the band statistics."""
    return pd.DataFrame({
        "label": pd.Categorical.from_codes(self.codes, categories=LABELS),
        "slope": self.slope, "intercept": self.intercept, "stderr": self.stderr,
        "pvalue": self.pvalue, "gmean_over_start": self.gmean_over_start,
        "gmean_over_end": self.gmean_over_end, "variance_over_gmean": self.variance_over_gmean})


def check_steps(steps, num_columns: int | None = None) -> np.ndarray:
  """[C] float64 steps: finite, >= 0, strictly increasing (one per column when num_columns)."""
  steps = np.asarray(steps, dtype=np.float64)
  if steps.ndim != 1 or (num_columns is not None and steps.shape[0] != num_columns):
    raise ValueError(f"steps must be a 1-D array with one step per checkpoint column "
                     f"({num_columns}), got shape {steps.shape}")
  if not np.all(np.isfinite(steps)) or np.any(steps < 0):
    raise ValueError(f"steps must be finite and >= 0, got {steps.tolist()}")
  if np.any(np.diff(steps) <= 0):
    raise ValueError(f"steps must be strictly increasing, got {steps.tolist()}")
  return steps


def start_index(steps, start_fraction: float) -> int:
  """Index of the checkpoint whose step is nearest start_fraction * steps[-1] (earlier on a tie)."""
  if not 0.0 <= start_fraction <= 1.0:
    raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction}")
  steps = np.asarray(steps, dtype=np.float64)
  return int(np.argmin(np.abs(steps - start_fraction * steps[-1])))


def window_problem(steps, start_fraction: float, what: str = "start fraction") -> str | None:
  """Why start_fraction cannot be fitted on these steps (fewer than 3 kept checkpoints, or a kept
  step 0 whose log is undefined), or None. What classify_trends raises, for checks made before
  any scoring."""
  steps = np.asarray(steps, dtype=np.float64)
  if steps.size == 0:
    return "no checkpoints"
  first = start_index(steps, start_fraction)
  kept = steps[first:]
  shown = f"steps {kept.astype(np.int64).tolist()} of {steps.astype(np.int64).tolist()}"
  if kept.shape[0] < 3:
    return (f"{what} {start_fraction:g} keeps {kept.shape[0]} checkpoint(s) ({shown}); the "
            f"trend t-test needs at least 3: lower the fraction or add checkpoints")
  if kept[0] <= 0:
    return (f"{what} {start_fraction:g} starts at step {kept[0]:g} ({shown}); the fit uses "
            f"log(step): use a {what} whose nearest checkpoint is after step 0")
  return None


def fit_window(values, steps, alpha: float = 0.05, band: float = BAND) -> TrendFit:
  """Labels every trajectory over all the given checkpoints (no start-fraction selection).

  values: [num_tokens, n] per-token perplexity (or loss) at each checkpoint; n >= 3.
  steps: [n] training steps, > 0 and strictly increasing.
  """
  values = np.asarray(values)
  if values.ndim != 2:
    raise ValueError(f"values must be [num_tokens, num_checkpoints], got shape {values.shape}")
  steps = check_steps(steps, values.shape[1])
  n = steps.shape[0]
  if n < 3:
    raise ValueError(f"the trend t-test needs at least 3 checkpoints (n - 2 degrees of freedom), "
                     f"got {n} (steps {steps.tolist()})")
  if steps[0] <= 0:
    raise ValueError(f"the fit uses log(step): every fitted step must be > 0, got "
                     f"{steps.tolist()}")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  x = np.log(steps)
  xc = x - x.mean()                       # [n]
  sxx = float(xc @ xc)
  num_tokens = values.shape[0]
  out = {k: np.full(num_tokens, np.nan) for k in (
      "slope", "intercept", "stderr", "pvalue", "gmean_over_start", "gmean_over_end",
      "variance_over_gmean")}
  codes = np.full(num_tokens, INVALID, np.int8)
  for lo in range(0, num_tokens, _BLOCK):
    v = values[lo:lo + _BLOCK].astype(np.float64)                   # [b, n]
    with np.errstate(divide="ignore", invalid="ignore"):
      y = v / v[:, :1]                                               # [b, n] normalised
    ok = np.all(np.isfinite(y), axis=1)                              # [b]
    if not ok.all():
      v, y = v[ok], y[ok]
    ybar = y.mean(axis=1)                                            # [b]
    yc = y - ybar[:, None]                                           # [b, n] centred: a constant
    # trajectory gets b == 0 exactly; einsum, not a BLAS product, whose threads crawl on a busy
    # machine.
    b = np.einsum("bn,n->b", yc, xc) / sxx                           # [b]
    a = ybar - b * x.mean()
    resid = yc - b[:, None] * xc[None, :]                            # [b, n] = y - a - b x
    sse = np.einsum("bn,bn->b", resid, resid)
    se = np.sqrt(sse / (n - 2) / sxx)
    # Exact fits (se == 0): t = 0 when b == 0 (p = 1), else +-inf (p = 0); see the module docstring.
    t = np.divide(b, se, out=np.where(b == 0, 0.0, np.copysign(np.inf, b)), where=se > 0)
    p = 2.0 * special.stdtr(n - 2, -np.abs(t))    # = 2 * scipy.stats.t.sf(|t|, n - 2)
    # The band: non-positive values (impossible for a perplexity) give G = 0 or NaN: outside.
    with np.errstate(divide="ignore", invalid="ignore"):
      g = np.exp(np.log(v).mean(axis=1))                             # [b] geometric mean
      g_start, g_end = g / v[:, 0], g / v[:, -1]
      var_g = v.var(axis=1) / g
    inside = ((g_start > 1 - band) & (g_start < 1 + band) & (g_end > 1 - band)
              & (g_end < 1 + band) & (v.var(axis=1) < g))
    code = np.where(p < alpha, np.where(b > 0, UPWARD, DOWNWARD),
                    np.where(inside, STAGNATED, UNCLASSIFIED)).astype(np.int8)
    idx = np.arange(lo, lo + ok.shape[0])[ok]
    for key, value in (("slope", b), ("intercept", a), ("stderr", se), ("pvalue", p),
                       ("gmean_over_start", g_start), ("gmean_over_end", g_end),
                       ("variance_over_gmean", var_g)):
      out[key][idx] = value
    codes[idx] = code
  return TrendFit(codes=codes, **out, steps=steps, columns=np.arange(n), alpha=alpha, band=band)


def classify_trends(values, steps, start_fraction: float = 0.1, alpha: float = 0.05,
                    band: float = BAND) -> TrendFit:
  """Trend of every token from the checkpoint nearest start_fraction * last step to the end.

  values: [num_tokens, num_checkpoints] per-token perplexity (or loss), any float dtype.
  steps: [num_checkpoints] training steps, >= 0 and strictly increasing (step 0 allowed before
  the kept window).
  Returns a TrendFit whose `columns` are the kept checkpoint indices into `steps`.
  Raises ValueError when fewer than 3 checkpoints are kept or the kept window holds step 0.
  """
  values = np.asarray(values)
  if values.ndim != 2:
    raise ValueError(f"values must be [num_tokens, num_checkpoints], got shape {values.shape}")
  steps = check_steps(steps, values.shape[1])
  problem = window_problem(steps, start_fraction)
  if problem:
    raise ValueError(problem)
  first = start_index(steps, start_fraction)
  fit = fit_window(values[:, first:], steps[first:], alpha, band)
  return dataclasses.replace(fit, columns=np.arange(first, steps.shape[0]),
                             start_fraction=start_fraction)
