"""Per-token trend classification: OLS of a normalised trajectory on log(step), t-test on the slope.

The method of Xia et al. (2023), section 3, as a closed form vectorised over tokens:

  1. keep the checkpoints from the one whose step is nearest `start_fraction * steps[-1]` (the
     earlier one on a tie) to the last;
  2. divide each token's trajectory by its first kept value: y_t = v_t / v_start;
  3. fit y = a + b * log(step) by ordinary least squares over the n kept checkpoints;
  4. two-sided t-test of b = 0 with n - 2 degrees of freedom:
       Sxx = sum (x - mean x)^2,  b = sum (x - mean x)(y - mean y) / Sxx,  a = mean y - b mean x,
       s^2 = sum (y - a - b x)^2 / (n - 2),  se(b) = sqrt(s^2 / Sxx),  t = b / se(b),
       p = 2 * P(T_{n-2} > |t|)   (the formulas statsmodels' OLS uses; tests compare the two).

Labels: `stagnated` if p >= alpha, `upward` if p < alpha and b > 0, `downward` if p < alpha and
b < 0. `invalid` if any kept value is non-finite or the first kept value is 0 (the normalisation is
undefined); invalid tokens have NaN slope, intercept, stderr and p-value and are counted.

Degenerate fits (documented choice, the t statistic is 0/0 or b/0 there): a trajectory that the line
fits exactly (residual sum of squares exactly 0) gets se(b) = 0 and
  * b == 0 (e.g. a constant trajectory): t = 0, p = 1 -> stagnated;
  * b != 0: t = +-inf, p = 0 -> upward / downward.

Pure numpy/scipy: never imports JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import special

LABELS = ("stagnated", "upward", "downward", "invalid")
STAGNATED, UPWARD, DOWNWARD, INVALID = range(4)

# Rows per block: bounds the float64 temporaries ([block, n] arrays) and keeps them in cache
# (4096 rows measured ~3x faster than 65536 on 20k x 40).
_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class TrendFit:
  """Per-token trend of one model's trajectories over the kept checkpoints.

  codes, slope, intercept, stderr, pvalue: [num_tokens]; codes index LABELS (int8);
  slope/intercept are in units of the normalised trajectory per unit log(step) (dimensionless).
  steps: [n] the kept steps; columns: [n] their indices in the steps given to classify_trends.
  """

  codes: np.ndarray
  slope: np.ndarray
  intercept: np.ndarray
  stderr: np.ndarray
  pvalue: np.ndarray
  steps: np.ndarray
  columns: np.ndarray
  alpha: float
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
    """One row per token: label, slope, intercept, stderr, pvalue."""
    return pd.DataFrame({
        "label": pd.Categorical.from_codes(self.codes, categories=LABELS),
        "slope": self.slope, "intercept": self.intercept, "stderr": self.stderr,
        "pvalue": self.pvalue})


def _check_steps(steps, num_columns: int) -> np.ndarray:
  steps = np.asarray(steps, dtype=np.float64)
  if steps.ndim != 1 or steps.shape[0] != num_columns:
    raise ValueError(f"steps must be a 1-D array with one step per checkpoint column "
                     f"({num_columns}), got shape {steps.shape}")
  if not np.all(np.isfinite(steps)) or np.any(steps <= 0):
    raise ValueError(f"steps must be finite and > 0 (the fit uses log(step)), got {steps.tolist()}")
  if np.any(np.diff(steps) <= 0):
    raise ValueError(f"steps must be strictly increasing, got {steps.tolist()}")
  return steps


def start_index(steps, start_fraction: float) -> int:
  """Index of the checkpoint whose step is nearest start_fraction * steps[-1] (earlier on a tie)."""
  if not 0.0 <= start_fraction <= 1.0:
    raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction}")
  steps = np.asarray(steps, dtype=np.float64)
  return int(np.argmin(np.abs(steps - start_fraction * steps[-1])))


def fit_window(values, steps, alpha: float = 0.05) -> TrendFit:
  """Classifies every trajectory over all the given checkpoints (no start-fraction selection).

  values: [num_tokens, n] per-token loss (nats) or perplexity at each checkpoint; n >= 3.
  steps: [n] training steps, > 0 and strictly increasing.
  """
  values = np.asarray(values)
  if values.ndim != 2:
    raise ValueError(f"values must be [num_tokens, num_checkpoints], got shape {values.shape}")
  steps = _check_steps(steps, values.shape[1])
  n = steps.shape[0]
  if n < 3:
    raise ValueError(f"the trend t-test needs at least 3 checkpoints (n - 2 degrees of freedom), "
                     f"got {n} (steps {steps.tolist()})")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  x = np.log(steps)
  xc = x - x.mean()                       # [n]
  sxx = float(xc @ xc)
  num_tokens = values.shape[0]
  slope = np.full(num_tokens, np.nan)
  intercept = np.full(num_tokens, np.nan)
  stderr = np.full(num_tokens, np.nan)
  pvalue = np.full(num_tokens, np.nan)
  codes = np.full(num_tokens, INVALID, np.int8)
  for lo in range(0, num_tokens, _BLOCK):
    v = values[lo:lo + _BLOCK].astype(np.float64)                   # [b, n]
    with np.errstate(divide="ignore", invalid="ignore"):
      y = v / v[:, :1]                                               # [b, n] normalised
    ok = np.all(np.isfinite(y), axis=1)                              # [b]
    y = y[ok]
    ybar = y.mean(axis=1)                                            # [b]
    b = (y - ybar[:, None]) @ xc / sxx                               # [b]
    a = ybar - b * x.mean()
    resid = y - a[:, None] - b[:, None] * x[None, :]                 # [b, n]
    sse = np.einsum("bn,bn->b", resid, resid)
    se = np.sqrt(sse / (n - 2) / sxx)
    # Exact fits (se == 0): t = 0 when b == 0 (p = 1), else +-inf (p = 0); see the module docstring.
    t = np.divide(b, se, out=np.where(b == 0, 0.0, np.copysign(np.inf, b)), where=se > 0)
    p = 2.0 * special.stdtr(n - 2, -np.abs(t))    # = 2 * scipy.stats.t.sf(|t|, n - 2)
    code = np.where(p >= alpha, STAGNATED, np.where(b > 0, UPWARD, DOWNWARD)).astype(np.int8)
    idx = np.arange(lo, lo + v.shape[0])[ok]
    slope[idx], intercept[idx], stderr[idx], pvalue[idx], codes[idx] = b, a, se, p, code
  return TrendFit(codes=codes, slope=slope, intercept=intercept, stderr=stderr, pvalue=pvalue,
                  steps=steps, columns=np.arange(n), alpha=alpha)


def classify_trends(losses, steps, start_fraction: float = 0.1, alpha: float = 0.05) -> TrendFit:
  """Trend of every token from the checkpoint nearest start_fraction * last step to the end.

  losses: [num_tokens, num_checkpoints] per-token loss (nats) or perplexity, any float dtype.
  steps: [num_checkpoints] training steps, > 0 and strictly increasing.
  Returns a TrendFit whose `columns` are the kept checkpoint indices into `steps`.
  Raises ValueError when fewer than 3 checkpoints are kept.
  """
  losses = np.asarray(losses)
  if losses.ndim != 2:
    raise ValueError(f"losses must be [num_tokens, num_checkpoints], got shape {losses.shape}")
  steps = _check_steps(steps, losses.shape[1])
  first = start_index(steps, start_fraction)
  kept = steps[first:]
  if kept.shape[0] < 3:
    raise ValueError(
        f"start_fraction={start_fraction} keeps {kept.shape[0]} checkpoint(s) (steps "
        f"{kept.astype(np.int64).tolist()} of {steps.astype(np.int64).tolist()}); the trend t-test "
        f"needs at least 3: lower start_fraction or add checkpoints")
  fit = fit_window(losses[:, first:], kept, alpha)
  return dataclasses.replace(fit, columns=np.arange(first, steps.shape[0]),
                             start_fraction=start_fraction)
