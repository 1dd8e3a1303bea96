"""Vectorised trend classification vs a per-token statsmodels OLS loop (one run, one ratio).

  python benchmarks/trends_vs_statsmodels.py --tokens=20000 --checkpoints=40 --loop_tokens=2000

Times classify_trends on the whole [tokens, checkpoints] matrix (best of --repeats) and the
statsmodels loop (OLS + p-value per token, the obvious reference implementation) on the first
--loop_tokens tokens; the loop's time for all tokens is extrapolated linearly from the subset
(the loop is a fixed cost per token) unless --loop_tokens=0, which times the loop on every token.
Also checks both give the same slopes and p-values on the subset (rtol 1e-8).
"""

import time

import numpy as np
import statsmodels.api as sm
from absl import app, flags

from experiments.analysis import trends

_TOKENS = flags.DEFINE_integer("tokens", 20000, "tokens (rows)")
_CHECKPOINTS = flags.DEFINE_integer("checkpoints", 40, "checkpoints (columns)")
_LOOP_TOKENS = flags.DEFINE_integer("loop_tokens", 2000, "tokens timed in the statsmodels loop "
                                    "(0: all); the full loop time is extrapolated from them")
_START_FRACTION = flags.DEFINE_float("start_fraction", 0.1, "start fraction of the fit")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timings of the vectorised version (best is kept)")


def statsmodels_loop(values, steps, columns, alpha):
  x = sm.add_constant(np.log(steps[columns]))
  slope, pvalue, labels = [], [], []
  for row in values:
    y = row[columns] / row[columns[0]]
    res = sm.OLS(y, x).fit()
    slope.append(res.params[1])
    pvalue.append(res.pvalues[1])
    # The slope's label; the band (stagnated vs unclassified) is tests/test_trends.py's business.
    labels.append("none" if res.pvalues[1] >= alpha else
                  "upward" if res.params[1] > 0 else "downward")
  return np.asarray(slope), np.asarray(pvalue), np.asarray(labels)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  n, c = _TOKENS.value, _CHECKPOINTS.value
  # Evenly spaced like the published OPT checkpoints, so most columns are kept by the fit.
  steps = np.round(np.linspace(143_000 / c, 143_000, c))
  trend = rng.normal(0, 0.05, (n, 1)) * np.log(steps)[None, :]
  values = np.exp(rng.normal(2.0, 0.3, (n, c)) + trend).astype(np.float32)

  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    fit = trends.classify_trends(values, steps, _START_FRACTION.value)
    times.append(time.perf_counter() - start)
  vectorised = min(times)

  m = n if _LOOP_TOKENS.value <= 0 else min(_LOOP_TOKENS.value, n)
  start = time.perf_counter()
  slope, pvalue, labels = statsmodels_loop(values[:m].astype(np.float64), steps, fit.columns, 0.05)
  loop_subset = time.perf_counter() - start
  loop_full = loop_subset * n / m

  np.testing.assert_allclose(fit.slope[:m], slope, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(fit.pvalue[:m], pvalue, rtol=1e-8, atol=1e-12)
  got = np.where(np.isin(fit.labels[:m], ("stagnated", "unclassified")), "none", fit.labels[:m])
  assert (got == labels).all()
  kind = "measured" if m == n else f"extrapolated from {m} tokens ({loop_subset:.2f} s)"
  print(f"matrix: {n} tokens x {c} checkpoints, {len(fit.columns)} kept (start fraction "
        f"{_START_FRACTION.value})")
  print(f"vectorised classify_trends: {vectorised * 1e3:.1f} ms (best of {_REPEATS.value})")
  print(f"statsmodels per-token loop: {loop_full:.2f} s ({kind})")
  print(f"speed-up: {loop_full / vectorised:.0f}x; results equal on {m} tokens (rtol 1e-8)")


if __name__ == "__main__":
  app.run(main)
