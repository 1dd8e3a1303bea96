"""In-context learning metrics and what predicts them: pure numpy/pandas/scipy (no JAX).

Per (model, step, task), from each option's summed log-prob (nats), token count and character count
(the paper's protocol first, then two conventions kept beside it):
  accuracy              the paper's headline: the option with the highest mean log-prob per token
                        of the option (its length in the model's tokens; Srivastava et al.'s
                        "probability normalised over its length") has the top target score
  accuracy_summed       the option with the highest summed log-prob (lm-evaluation-harness's acc)
  accuracy_per_char     the option with the highest log-prob per character of the continuation as
                        scored (lm-evaluation-harness's acc_norm; the characters include the leading
                        whitespace the boundary convention moves into the continuation)
  correct_option_ppl    exp(mean over examples of the correct option's per-token NLL)
  incorrect_option_ppl  exp(mean over examples of the mean per-token NLL of the other options)
                        (both are geometric means of per-option perplexities: robust to the odd huge
                        one)
  correct_option_tokens, incorrect_option_tokens   tokens of those options over the task's examples
                        (the weights of the token-weighted averages over tasks)
  random_baseline       mean over examples of 1 / (number of options)
Ties in log-prob go to the first option (numpy argmax); any option with the top score counts.

The table `icl_results.csv` (one row per model, step, task) has the columns RESULT_COLUMNS. Another
source (lm-evaluation-harness files, another framework) can feed the same analysis with a CSV of
those columns: model, step, params, tokens, flops, validation_ppl, task and accuracy are required;
the others may be empty (NaN), which skips what needs them.

Across checkpoints (`mean_accuracy`, `correlations`, `bootstrap_correlations`): mean accuracy over
the tasks every checkpoint has, raw and above random (accuracy - random_baseline, averaged over
tasks); option perplexities aggregated over tasks as exp(sum_t w_t log ppl_t / sum_t w_t) with w_t
the task's option token count (the authors' `aggregate_option_perplexity`). Against x in
(validation_ppl, flops, params), pooled over every size and step: Spearman's rho (scipy) and the
R^2 of the least-squares line y = a + b log(x). Rows whose x is missing or not positive (FLOPs at
step 0) are left out of that x's statistics; n says how many remained. 95% intervals: percentile
bootstrap over checkpoints and tasks together (each replicate resamples the checkpoints and the
tasks with replacement, recomputes the mean over the resampled tasks, then rho and R^2). A
predictor is called best only when the interval of R^2(validation_ppl) - R^2(x), on the
checkpoints every predictor has, lies above 0 for every other x.

Task groups (`group_curves`): the paper's linearity and breakthroughness tasks
(experiments.tasks.bigbench.TASK_GROUPS), per checkpoint having all of the group's tasks present:
mean accuracy and the token-weighted option perplexities, each also smoothed along each size's
steps by the authors' exponential moving average (`ema`: s_0 = y_0, s_i = w s_{i-1} + (1 - w) y_i;
w = 0.5 as in their figures of mean accuracy). `final_option_ppl`: the same option perplexities at
each size's last checkpoint (the paper's Figure 5, right).

Per task (`task_scaling`, an extra table beside the paper's fixed groups), following the BIG-bench
paper (Srivastava et al. 2022, appendix on linearity and breakthroughness), for scores y_1..y_n
ordered by scale (here: by decreasing validation perplexity, optionally averaged within `n_bins`
quantile bins of log perplexity):
  I(y) = sign(argmax_i y_i - argmin_i y_i) * (max_i y_i - min_i y_i)     overall improvement
  L(y) = I(y) / sqrt(mean_i (y_{i+1} - y_i)^2)                          linearity
  B(y) = I(y) / sqrt(median_i (y_{i+1} - y_i)^2)                        breakthroughness
L is largest when the improvement is spread evenly over the steps, B when it comes in a few jumps
(a median of zero with I > 0 gives B = inf). Flat curves (I = 0) get 0 for both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from opt_jax.errors import InputError

RESULT_COLUMNS = ("model", "step", "params", "tokens", "flops", "validation_ppl", "task", "n",
                  "accuracy", "accuracy_summed", "accuracy_per_char", "correct_option_ppl",
                  "incorrect_option_ppl", "correct_option_tokens", "incorrect_option_tokens",
                  "random_baseline")
REQUIRED_COLUMNS = ("model", "step", "params", "tokens", "flops", "validation_ppl", "task",
                    "accuracy")
X_COLUMNS = ("validation_ppl", "flops", "params")
CHECKPOINT_COLUMNS = ("model", "step", "params", "tokens", "flops", "validation_ppl")
ACCURACY_YS = ("accuracy", "accuracy_above_random", "accuracy_summed", "accuracy_per_char")
OPTION_YS = ("correct_option_ppl", "incorrect_option_ppl", "log_option_ppl_gap")
EMA_WEIGHT = 0.5
BOOTSTRAP_REPLICATES = 1000


# Per-task metrics -------------------------------------------------------------------------------

def random_baseline(option_counts: Sequence[int]) -> float:
  """Expected accuracy of a uniform random guess: mean over examples of 1 / options."""
  counts = np.asarray(option_counts, dtype=np.float64)
  if counts.size == 0 or not (counts >= 1).all():
    raise ValueError(f"option counts must be at least 1, got {list(counts[:5])}")
  return float(np.mean(1.0 / counts))


def task_metrics(logprobs: Sequence[Sequence[float]], n_tokens: Sequence[Sequence[int]],
                 n_chars: Sequence[Sequence[int]], scores: Sequence[Sequence[float]]
                 ) -> dict[str, float]:
  """Metrics of one task from per-example, per-option arrays (ragged: options vary).

  logprobs: summed log p(option | prompt) in nats; n_tokens, n_chars: the option's length in
  tokens and characters as scored; scores: target scores (the correct options have the maximum).
  Returns n and the per-task columns of the module docstring.
  """
  n = len(logprobs)
  if n == 0:
    raise ValueError("task_metrics needs at least one example")
  hit, hit_sum, hit_char, nll_c, nll_i, tok_c, tok_i = [], [], [], [], [], 0, 0
  for e, (lp, nt, nc, sc) in enumerate(zip(logprobs, n_tokens, n_chars, scores)):
    lp, nt, nc, sc = (np.asarray(a, np.float64) for a in (lp, nt, nc, sc))
    if not (lp.shape == nt.shape == nc.shape == sc.shape) or lp.size < 2:
      raise ValueError(f"example {e}: expected the same number (>= 2) of log-probs, token counts, "
                       f"character counts and scores, got {lp.size}, {nt.size}, {nc.size}, "
                       f"{sc.size}")
    if (nt < 1).any() or (nc < 1).any():
      raise ValueError(f"example {e}: every option needs at least one token and one character")
    top = sc == sc.max()
    hit.append(top[np.argmax(lp / nt)])
    hit_sum.append(top[np.argmax(lp)])
    hit_char.append(top[np.argmax(lp / nc)])
    per_token = -lp / nt
    c = int(np.argmax(sc))
    nll_c.append(per_token[c])
    nll_i.append(np.delete(per_token, c).mean())
    tok_c += int(nt[c])
    tok_i += int(nt.sum() - nt[c])
  return {"n": n, "accuracy": float(np.mean(hit)), "accuracy_summed": float(np.mean(hit_sum)),
          "accuracy_per_char": float(np.mean(hit_char)),
          "correct_option_ppl": float(np.exp(np.mean(nll_c))),
          "incorrect_option_ppl": float(np.exp(np.mean(nll_i))),
          "correct_option_tokens": tok_c, "incorrect_option_tokens": tok_i,
          "random_baseline": random_baseline([len(s) for s in scores])}


def accuracy_stderr(accuracy: float, n: float) -> float:
  """lm-evaluation-harness's standard error of a mean metric (metrics.mean_stderr: the sample
  standard deviation, n - 1 in the denominator, over sqrt(n)) for 0/1 items with mean
  `accuracy`: sqrt(p (1 - p) / (n - 1)). NaN for n < 2 (lm-eval writes "N/A")."""
  if not np.isfinite(n) or n < 2 or not np.isfinite(accuracy):
    return float("nan")
  return float(np.sqrt(accuracy * (1 - accuracy) / (n - 1)))


# Reading and checking result tables -------------------------------------------------------------

def check_results(df: pd.DataFrame, source: str = "results") -> pd.DataFrame:
  """`df` with every RESULT_COLUMNS column (missing optional ones added as NaN), typed.

  Raises ValueError naming the source and what is wrong: missing required columns, duplicate
  (model, step, task) rows, non-numeric values.
  """
  missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
  if missing:
    raise InputError(f"{source}: missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
  df = df.copy()
  for c in RESULT_COLUMNS:
    if c not in df.columns:
      df[c] = np.nan
  for c in RESULT_COLUMNS:
    if c in ("model", "task"):
      df[c] = df[c].astype(str)
      continue
    try:
      df[c] = pd.to_numeric(df[c])
    except (ValueError, TypeError) as e:
      raise InputError(f"{source}: column {c!r} must be numeric ({e})") from e
  df["step"] = df["step"].astype(np.int64)
  # Extra key columns (k_shot) tell apart rows of several settings in one table.
  key = ["model", "step", "task"] + [c for c in ("k_shot",) if c in df.columns]
  dup = df.duplicated(key, keep=False)
  if dup.any():
    first = df[dup].iloc[0]
    raise InputError(f"{source}: {int(dup.sum())} rows repeat a ({', '.join(key)}), e.g. "
                     f"({', '.join(str(first[k]) for k in key)})")
  extra = [c for c in df.columns if c not in RESULT_COLUMNS]
  return df[list(RESULT_COLUMNS) + extra].sort_values(key[-1:] + key[:-1] if len(key) > 3
                                                      else key, ignore_index=True)


# Across checkpoints -----------------------------------------------------------------------------

def common_tasks(results: pd.DataFrame) -> list[str]:
  """Tasks with a non-missing accuracy at every (model, step)."""
  ok = results.dropna(subset=["accuracy"])
  n_ckpt = results.groupby(["model", "step"]).ngroups
  counts = ok.groupby("task")[["model", "step"]].apply(lambda g: len(g.drop_duplicates()))
  return sorted(counts.index[counts == n_ckpt])


def _matrix(results: pd.DataFrame, tasks: Sequence[str], col: str) -> np.ndarray:
  """[checkpoints in (model, step) order, tasks] of one column (NaN where absent)."""
  p = results[results["task"].isin(tasks)].set_index(["model", "step", "task"])[col]
  return p.unstack("task").reindex(columns=list(tasks)).sort_index().to_numpy(np.float64)


def _option_weights(results: pd.DataFrame, tasks: Sequence[str], which: str) -> np.ndarray:
  """Token weights [checkpoints, tasks] of one option kind; 1 where unknown (imports)."""
  w = _matrix(results, tasks, f"{which}_option_tokens")
  return np.where(np.isfinite(w) & (w > 0), w, 1.0)


def _task_means(results: pd.DataFrame, tasks: Sequence[str], y: str,
                task_weights: np.ndarray) -> np.ndarray:
  """y per checkpoint [C, R] aggregated over tasks with task_weights [R, T] (resample counts):
  a weighted mean for the accuracies, the token-weighted log mean (exponentiated) for the option
  perplexities, the difference of the two log means for log_option_ppl_gap."""
  def log_mean(which):
    lw = np.log(_matrix(results, tasks, f"{which}_option_ppl"))
    tw = _option_weights(results, tasks, which)
    return ((lw * tw) @ task_weights.T) / (tw @ task_weights.T)
  if y == "log_option_ppl_gap":
    return log_mean("incorrect") - log_mean("correct")
  if y in ("correct_option_ppl", "incorrect_option_ppl"):
    return np.exp(log_mean(y.split("_")[0]))
  if y == "accuracy_above_random":
    v = _matrix(results, tasks, "accuracy") - _matrix(results, tasks, "random_baseline")
  else:
    v = _matrix(results, tasks, y)
  return (v @ task_weights.T) / task_weights.sum(1)


def mean_accuracy(results: pd.DataFrame, tasks: Sequence[str] | None = None) -> pd.DataFrame:
  """One row per (model, step): CHECKPOINT_COLUMNS, n_tasks, the ACCURACY_YS and random_baseline
  (means over `tasks`, default `common_tasks`), and the OPTION_YS (token-weighted over tasks)."""
  tasks = common_tasks(results) if tasks is None else list(tasks)
  if not tasks:
    raise InputError("no task has an accuracy at every checkpoint; nothing to average")
  df = results[results["task"].isin(tasks)]
  g = df.groupby(["model", "step"], sort=True)
  out = g[list(CHECKPOINT_COLUMNS[2:])].first()
  out["n_tasks"] = g["task"].nunique()
  ones = np.ones((1, len(tasks)))
  full = check_results(results) if any(c not in results.columns for c in RESULT_COLUMNS) \
      else results
  for c in ACCURACY_YS + ("random_baseline",) + OPTION_YS:
    out[c] = _task_means(full, tasks, c, ones)[:, 0]
  return out.reset_index()


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> np.ndarray:
  """The authors' exponential moving average (utils.exponential_moving_average): s_0 = y_0,
  s_i = weight * s_{i-1} + (1 - weight) * y_i."""
  y = np.asarray(values, np.float64)
  out = np.empty_like(y)
  for i, v in enumerate(y):
    out[i] = v if i == 0 else weight * out[i - 1] + (1 - weight) * v
  return out


def group_curves(results: pd.DataFrame, groups: Mapping[str, Sequence[str]],
                 weight: float = EMA_WEIGHT) -> tuple[pd.DataFrame, dict[str, list[str]]]:
  """Per group and checkpoint: CHECKPOINT_COLUMNS, n_tasks, accuracy, random_baseline,
  correct_option_ppl, incorrect_option_ppl, and each of the last four smoothed along each
  model's steps (`<col>_ema`). A group uses its tasks present in `results`; a checkpoint lacking
  any of them is left out (as the authors' notebook does). Returns (table, {group: tasks used}).
  """
  rows, used = [], {}
  for group, names in groups.items():
    tasks = [t for t in names if t in set(results["task"])]
    used[group] = tasks
    if not tasks:
      continue
    sub = results[results["task"].isin(tasks)]
    complete = sub.dropna(subset=["accuracy"]).groupby(["model", "step"])["task"].nunique()
    keep = complete[complete == len(tasks)].index
    sub = sub.set_index(["model", "step"]).loc[keep].reset_index()
    if sub.empty:
      continue
    m = mean_accuracy(sub, tasks)
    m.insert(0, "group", group)
    for c in ("accuracy", "random_baseline", "correct_option_ppl", "incorrect_option_ppl"):
      m[c + "_ema"] = np.nan
      for _, idx in m.groupby("model").groups.items():
        order = m.loc[idx].sort_values("step").index
        m.loc[order, c + "_ema"] = ema(m.loc[order, c], weight)
    rows.append(m[["group", *CHECKPOINT_COLUMNS, "n_tasks", "accuracy", "random_baseline",
                   "correct_option_ppl", "incorrect_option_ppl", "accuracy_ema",
                   "random_baseline_ema", "correct_option_ppl_ema", "incorrect_option_ppl_ema"]])
  table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
      columns=["group", *CHECKPOINT_COLUMNS, "n_tasks", "accuracy"])
  return table, used


def final_option_ppl(means: pd.DataFrame) -> pd.DataFrame:
  """Each model's last checkpoint: model, step, params, n_tasks, correct_option_ppl,
  incorrect_option_ppl (the paper's Figure 5, right), smallest model first."""
  last = means.sort_values(["model", "step"]).groupby("model").tail(1)
  cols = ["model", "step", "params", "n_tasks", "correct_option_ppl", "incorrect_option_ppl"]
  return last[cols].sort_values(["params", "model"], ignore_index=True)


@dataclasses.dataclass(frozen=True)
class LogFit:
  """y = intercept + slope * log(x) by least squares; r2 = 1 - SS_res / SS_tot."""
  slope: float
  intercept: float
  r2: float
  n: int


def _constant(v: np.ndarray) -> bool:
  """All equal up to float rounding (rho and R^2 are undefined, not 0)."""
  return v.size == 0 or bool(np.ptp(v) <= 1e-9 * max(1.0, float(np.abs(v).max())))


def log_fit(x: Sequence[float], y: Sequence[float]) -> LogFit:
  """Least-squares fit of y on log(x); NaN slope/R^2 with fewer than 3 points or a constant x
  or y."""
  lx, y = np.log(np.asarray(x, np.float64)), np.asarray(y, np.float64)
  if lx.size < 3 or _constant(lx) or _constant(y):
    return LogFit(np.nan, np.nan, np.nan, int(lx.size))
  slope, intercept = np.polyfit(lx, y, 1)
  resid = y - (intercept + slope * lx)
  ss_tot = np.sum((y - y.mean()) ** 2)
  r2 = 1.0 - np.sum(resid ** 2) / ss_tot if ss_tot > 0 else np.nan
  return LogFit(float(slope), float(intercept), float(r2), int(lx.size))


def correlations(means: pd.DataFrame, y: str = "accuracy",
                 xs: Sequence[str] = X_COLUMNS) -> pd.DataFrame:
  """Columns x, spearman, r2, n, spearman_p, slope, intercept, y: one row per x, pooled over all
  sizes and steps; rows with a missing or non-positive x or a missing y are left out."""
  rows = []
  for x in xs:
    d = means[[x, y]].replace([np.inf, -np.inf], np.nan).dropna()
    d = d[d[x] > 0]
    fit = log_fit(d[x], d[y])
    if len(d) >= 3 and not _constant(d[x].to_numpy(np.float64)) and not _constant(
        d[y].to_numpy(np.float64)):
      rho, p = scipy.stats.spearmanr(d[x], d[y])
    else:
      rho, p = np.nan, np.nan
    rows.append({"x": x, "spearman": float(rho), "r2": fit.r2, "n": len(d),
                 "spearman_p": float(p), "slope": fit.slope, "intercept": fit.intercept, "y": y})
  return pd.DataFrame(rows)


def residuals_by_model(means: pd.DataFrame, x: str = "validation_ppl", y: str = "accuracy"
                       ) -> pd.DataFrame:
  """Per model: mean and max |residual| of y around the pooled fit y = a + b log(x).

  If x predicts y independently of size (the paper's claim for perplexity), every model's mean
  residual is near 0; a size effect at equal x shows up as residuals of opposite signs."""
  d = means.replace([np.inf, -np.inf], np.nan).dropna(subset=[x, y])
  d = d[d[x] > 0]
  fit = log_fit(d[x], d[y])
  r = d[y] - (fit.intercept + fit.slope * np.log(d[x]))
  out = pd.DataFrame({"model": d["model"], "residual": r})
  g = out.groupby("model")["residual"]
  return pd.DataFrame({"mean_residual": g.mean(), "max_abs_residual": g.apply(
      lambda s: s.abs().max()), "n": g.size()}).reset_index()


# Per task: trajectories, linearity, breakthroughness -------------------------------------------

def improvement(y: Sequence[float]) -> float:
  """I(y) = sign(argmax y - argmin y) * (max y - min y)."""
  y = np.asarray(y, np.float64)
  if y.size < 2:
    return 0.0
  return float(np.sign(int(np.argmax(y)) - int(np.argmin(y))) * (y.max() - y.min()))


def _ratio(i: float, denom: float) -> float:
  if i == 0:
    return 0.0
  return float(np.sign(i) * np.inf) if denom == 0 else float(i / denom)


def linearity(y: Sequence[float]) -> float:
  """L(y) = I(y) / sqrt(mean((y[i+1] - y[i])^2)); 0 for a flat curve."""
  d = np.diff(np.asarray(y, np.float64))
  return 0.0 if d.size == 0 else _ratio(improvement(y), float(np.sqrt(np.mean(d ** 2))))


def breakthroughness(y: Sequence[float]) -> float:
  """B(y) = I(y) / sqrt(median((y[i+1] - y[i])^2)); 0 for a flat curve, inf when the median
  step is 0 but the curve improves."""
  d = np.diff(np.asarray(y, np.float64))
  return 0.0 if d.size == 0 else _ratio(improvement(y), float(np.sqrt(np.median(d ** 2))))


def ordered_scores(df: pd.DataFrame, y: str = "accuracy", x: str = "validation_ppl",
                   n_bins: int | None = None) -> np.ndarray:
  """y ordered from the worst to the best language model (decreasing validation perplexity;
  increasing x for flops or params). With n_bins, y is averaged within n_bins equal-count bins
  of that order (fewer when there are fewer points)."""
  d = df[[x, y]].dropna()
  ascending = x != "validation_ppl"
  d = d.sort_values(x, ascending=ascending, kind="stable")
  values = d[y].to_numpy(np.float64)
  if n_bins and len(values) > n_bins:
    values = np.array([b.mean() for b in np.array_split(values, n_bins)])
  return values


def task_scaling(results: pd.DataFrame, y: str = "accuracy", x: str = "validation_ppl",
                 n_bins: int | None = 10) -> pd.DataFrame:
  """Per task: improvement, linearity, breakthroughness (of `ordered_scores`), n_points, and the
  first / last binned score; sorted by task."""
  rows = []
  for task, d in results.groupby("task", sort=True):
    v = ordered_scores(d, y, x, n_bins)
    rows.append({"task": task, "improvement": improvement(v), "linearity": linearity(v),
                 "breakthroughness": breakthroughness(v), "n_points": len(v),
                 "first": float(v[0]) if len(v) else np.nan,
                 "last": float(v[-1]) if len(v) else np.nan})
  return pd.DataFrame(rows)


def top_tasks(scaling: pd.DataFrame, by: str, k: int = 5) -> list[str]:
  """The k tasks with the largest `by` (linearity or breakthroughness); ties by task name."""
  d = scaling.sort_values([by, "task"], ascending=[False, True], kind="stable")
  return list(d["task"].head(k))




# Bootstrap intervals over checkpoints and tasks --------------------------------------------------

def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pearson r of each row pair of a, b [R, n]; NaN for a constant row."""
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
  with np.errstate(invalid="ignore", divide="ignore"):
    r = (a * b).sum(1) / den
  scale = np.maximum(np.abs(a).max(1), np.abs(b).max(1))
  return np.where(den > 1e-12 * np.maximum(scale, 1.0) ** 2, r, np.nan)


def _replicate_stats(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(Spearman rho, R^2 of y on log x) per replicate row of x, y [R, n]."""
  def constant(v):   # all equal up to float rounding: rho and R^2 undefined (ranks would not say)
    return np.ptp(v, axis=1) <= 1e-9 * np.maximum(1.0, np.abs(v).max(1))
  undefined = constant(x) | constant(y)
  rho = _rowwise_pearson(scipy.stats.rankdata(x, axis=1), scipy.stats.rankdata(y, axis=1))
  r2 = _rowwise_pearson(np.log(x), y) ** 2
  return np.where(undefined, np.nan, rho), np.where(undefined, np.nan, r2)


def _interval(v: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  v = v[np.isfinite(v)]
  if v.size < 10:
    return float("nan"), float("nan")
  q = (1 - level) / 2
  return float(np.quantile(v, q)), float(np.quantile(v, 1 - q))


def bootstrap_correlations(results: pd.DataFrame, means: pd.DataFrame, tasks: Sequence[str],
                           ys: Sequence[str], xs: Sequence[str] = X_COLUMNS, *,
                           replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0
                           ) -> tuple[pd.DataFrame, pd.DataFrame]:
  """95% percentile-bootstrap intervals of the `correlations` statistics and of the comparison
  of validation perplexity with each other predictor.

  Each replicate draws the checkpoints (rows of `means`, i.e. `mean_accuracy(results, tasks)`)
  and the tasks with replacement, aggregates y over the drawn tasks at the drawn checkpoints
  (`_task_means`), and computes Spearman's rho and R^2 (y on log x). Returns
  (intervals: y, x, n, spearman_lo, spearman_hi, r2_lo, r2_hi, one row per y and x, on that x's
  valid checkpoints; comparisons: y, x, n, r2_diff, r2_diff_lo, r2_diff_hi, rho_diff,
  rho_diff_lo, rho_diff_hi for r2_diff = R^2(validation_ppl) - R^2(x) and rho_diff =
  |rho(validation_ppl)| - |rho(x)| on the checkpoints every x in `xs` has).
  """
  rng = np.random.default_rng(seed)
  n_ckpt, n_task = len(means), len(tasks)
  draws_t = rng.integers(0, n_task, size=(replicates, n_task))
  task_w = np.stack([np.bincount(d, minlength=n_task) for d in draws_t]).astype(np.float64)
  xv = {x: means[x].to_numpy(np.float64) for x in xs}
  valid = {x: np.isfinite(v) & (v > 0) for x, v in xv.items()}
  common = np.logical_and.reduce([valid[x] for x in xs])
  rows_i, rows_c = [], []

  def draw(mask):
    idx = np.flatnonzero(mask)
    return idx[rng.integers(0, idx.size, size=(replicates, idx.size))] if idx.size >= 3 else None

  for y in ys:
    per_ckpt = _task_means(results, tasks, y, task_w)     # [C, R]
    full = means[y].to_numpy(np.float64)
    if not np.isfinite(full).any():
      continue
    cols = np.arange(replicates)[:, None]
    for x in xs:
      ok = valid[x] & np.isfinite(full)
      rows = draw(ok)
      row = {"y": y, "x": x, "n": int(ok.sum())}
      if rows is None:
        rows_i.append({**row, "spearman_lo": np.nan, "spearman_hi": np.nan, "r2_lo": np.nan,
                       "r2_hi": np.nan})
        continue
      rho, r2 = _replicate_stats(xv[x][rows], per_ckpt[rows, cols])
      (rl, rh), (ql, qh) = _interval(rho), _interval(r2)
      rows_i.append({**row, "spearman_lo": rl, "spearman_hi": rh, "r2_lo": ql, "r2_hi": qh})
    ok = common & np.isfinite(full)
    rows = draw(ok)
    if "validation_ppl" not in xs or rows is None:
      continue
    yb = per_ckpt[rows, cols]
    rho_p, r2_p = _replicate_stats(xv["validation_ppl"][rows], yb)
    full_p = _point(xv["validation_ppl"][ok], full[ok])
    for x in xs:
      if x == "validation_ppl":
        continue
      rho_x, r2_x = _replicate_stats(xv[x][rows], yb)
      full_x = _point(xv[x][ok], full[ok])
      (dl, dh), (el, eh) = _interval(r2_p - r2_x), _interval(np.abs(rho_p) - np.abs(rho_x))
      rows_c.append({"y": y, "x": x, "n": int(ok.sum()), "r2_diff": full_p[1] - full_x[1],
                     "r2_diff_lo": dl, "r2_diff_hi": dh,
                     "rho_diff": abs(full_p[0]) - abs(full_x[0]), "rho_diff_lo": el,
                     "rho_diff_hi": eh})
  cols_i = ["y", "x", "n", "spearman_lo", "spearman_hi", "r2_lo", "r2_hi"]
  cols_c = ["y", "x", "n", "r2_diff", "r2_diff_lo", "r2_diff_hi", "rho_diff", "rho_diff_lo",
            "rho_diff_hi"]
  return pd.DataFrame(rows_i, columns=cols_i), pd.DataFrame(rows_c, columns=cols_c)


def _point(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(rho, R^2 on log x) of the full sample, NaN where undefined."""
  rho, r2 = _replicate_stats(x[None, :], y[None, :])
  return float(rho[0]), float(r2[0])


def ppl_ranges(means: pd.DataFrame) -> pd.DataFrame:
  """model, params, ppl_min, ppl_max (validation perplexity range of each size), smallest first."""
  d = means.dropna(subset=["validation_ppl"])
  d = d[d["validation_ppl"] > 0]
  g = d.groupby("model")
  out = pd.DataFrame({"params": g["params"].first(), "ppl_min": g["validation_ppl"].min(),
                      "ppl_max": g["validation_ppl"].max()}).reset_index()
  return out.sort_values(["params", "model"], ignore_index=True)


def overlapping_pairs(ranges: pd.DataFrame, overlap: bool = True) -> list[tuple[str, str]]:
  """Pairs of sizes whose validation perplexity ranges share at least one value (overlap=False:
  the pairs whose ranges do not meet)."""
  r = ranges.to_dict("records")
  return [(a["model"], b["model"]) for i, a in enumerate(r) for b in r[i + 1:]
          if (max(a["ppl_min"], b["ppl_min"]) <= min(a["ppl_max"], b["ppl_max"])) == overlap]
# lm-evaluation-harness result files -------------------------------------------------------------

PPL_METRICS = ("perplexity", "ppl", "word_perplexity", "token_perplexity", "byte_perplexity")


def _metric(task_results: Mapping[str, Any], metric: str) -> float | None:
  """`metric` from one task's results: 'acc' (harness <= 0.3) or 'acc,<filter>' (>= 0.4, 'none'
  filter preferred)."""
  if metric in task_results:
    return task_results[metric]
  keyed = sorted(k for k in task_results if k.split(",")[0] == metric)
  if not keyed:
    return None
  return task_results[f"{metric},none"] if f"{metric},none" in keyed else task_results[keyed[0]]


def _model_args(config: Mapping[str, Any]) -> dict[str, str]:
  args = config.get("model_args", "") if isinstance(config, Mapping) else ""
  if isinstance(args, Mapping):
    return {str(k): str(v) for k, v in args.items()}
  out = {}
  for part in str(args or "").split(","):
    if "=" in part:
      k, v = part.split("=", 1)
      out[k.strip()] = v.strip()
  return out


def _name_in(name: str, text: str) -> bool:
  """`name` occurs in `text` delimited by non-alphanumerics (opt-1.3b is not inside opt-13b)."""
  pattern = r"(?<![0-9a-z.])" + re.escape(name.lower()) + r"(?![0-9a-z])"
  return re.search(pattern, text.lower()) is not None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the import needs from a suite model (opt_jax.suite.SuiteModel has these fields)."""
  name: str
  params: int
  tokens_per_step: int
  aliases: tuple[str, ...] = ()


def _match_model(models: Sequence[Any], pretrained: str | None, relpath: str) -> tuple[Any, str]:
  if pretrained:
    for m in models:
      if pretrained.lower() in (n.lower() for n in (m.name, *m.aliases)):
        return m, ""
  text = relpath.replace("__", "/")
  hits = [(len(n), m) for m in models for n in (m.name, *m.aliases) if _name_in(n, text)]
  if not hits:
    return None, (f"no manifest model's name or alias equals pretrained={pretrained!r} or appears "
                  f"in the file name")
  best = max(h[0] for h in hits)
  winners = {m.name for length, m in hits if length == best}
  if len(winners) > 1:
    return None, f"the file name matches several models equally: {sorted(winners)}"
  return next(m for length, m in hits if length == best), ""


def _step(model_args: Mapping[str, str], relpath: str) -> int | None:
  m = re.fullmatch(r"(?:global_)?step[_-]?(\d+)", model_args.get("revision", "").strip())
  if m:
    return int(m.group(1))
  found = re.findall(r"(?<![a-z])step[_-]?(\d+)", relpath.lower())
  return int(found[-1]) if found else None


def import_lm_eval(results_dir: str, models: Sequence[Any], tasks: Sequence[str],
                   metric: str = "acc", ppl_task: str = "lambada_openai",
                   ppl_metric: str | None = None) -> tuple[pd.DataFrame, list[str]]:
  """Rows of RESULT_COLUMNS from a folder of lm-evaluation-harness result files (*.json with
  `results` and `config`, searched recursively; one file per checkpoint).

  Layouts: lm-eval 0.4.x writes `--output_path`/<model_name_sanitized>/results_<ISO date>.json
  (EvaluationTracker.save_results_aggregated) with config.model_args a string
  "pretrained=ORG/NAME,revision=stepN,..." (a dict through the Python API) and metrics keyed
  "acc,none"; lm-eval <= 0.3 one JSON per run with plain "acc" keys; `export_lm_eval` writes the
  0.4 layout. Re-runs of one checkpoint in one folder (several results_<date>.json) give the
  newest, the others are noted in problems; any other two files of one checkpoint are an error.

  models: objects with name, aliases, params, tokens_per_step (suite models). A file belongs to
  the model whose name or alias equals `pretrained=` in config.model_args, else whose name or
  alias appears in the file's path under results_dir (lm-eval's "org__name" folders read as
  "org/name"); its step is `revision=stepN`, else the last "stepN" in that path.
  accuracy = `metric`; accuracy_summed = "acc" and accuracy_per_char = "acc_norm" (lm-eval's
  names for those conventions) when present; validation_ppl = ppl_task's ppl_metric (default: the
  first of PPL_METRICS present). n is lm-eval's n-samples when recorded. Option perplexities and
  random baselines are unknown (NaN).

  Returns (rows, problems): a file that cannot be attributed, a missing task or metric is listed
  in problems and skipped. Raises ValueError when no row results, or two files give the same
  (model, step).
  """
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(results_dir) for f in fs
                 if f.endswith(".json"))
  if not files:
    raise InputError(f"{results_dir}: no .json result files")
  rows, problems, seen = [], [], {}
  for path in files:
    rel = os.path.relpath(path, results_dir)
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      problems.append(f"{rel}: not readable JSON ({e})")
      continue
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
      problems.append(f"{rel}: no 'results' object; not an lm-evaluation-harness result file")
      continue
    args = _model_args(data.get("config", {}))
    pretrained = args.get("pretrained") or (data.get("model_name")
                                            if isinstance(data.get("model_name"), str) else None)
    model, why = _match_model(models, pretrained, rel)
    if model is None:
      problems.append(f"{rel}: {why}")
      continue
    step = _step(args, rel)
    if step is None:
      problems.append(f"{rel}: no step: revision={args.get('revision')!r} is not stepN and the "
                      f"file name has no stepN")
      continue
    if (model.name, step) in seen:
      earlier = seen[(model.name, step)]
      if not _reruns(earlier, rel):
        raise InputError(f"{results_dir}: {earlier} and {rel} are both {model.name} step {step}")
      # Files are read in name order: a later results_<date>.json is the newer run.
      problems.append(f"{earlier}: an earlier run of {model.name} step {step} than {rel}; "
                      "using the newer")
      rows = [r for r in rows if (r["model"], r["step"]) != (model.name, step)]
    seen[(model.name, step)] = rel
    results = data["results"]
    ppl = np.nan
    if ppl_task in results:
      names = [ppl_metric] if ppl_metric else PPL_METRICS
      vals = [v for v in (_metric(results[ppl_task], n) for n in names) if v is not None]
      if vals:
        ppl = float(vals[0])
      else:
        problems.append(f"{rel}: task {ppl_task!r} has none of the metrics {list(names)}")
    else:
      problems.append(f"{rel}: no results for the perplexity task {ppl_task!r}")
    n_samples = data.get("n-samples", {})
    tokens = step * model.tokens_per_step
    for task in tasks:
      if task not in results:
        problems.append(f"{rel}: no results for task {task!r}")
        continue
      acc = _metric(results[task], metric)
      if acc is None:
        problems.append(f"{rel}: task {task!r} has no metric {metric!r} (has: "
                        f"{sorted(results[task])})")
        continue
      summed, per_char = (_metric(results[task], m) for m in ("acc", "acc_norm"))
      ns = n_samples.get(task, {}) if isinstance(n_samples, dict) else {}
      rows.append({"model": model.name, "step": step, "params": model.params, "tokens": tokens,
                   "flops": 6.0 * model.params * tokens, "validation_ppl": ppl, "task": task,
                   "n": ns.get("effective", np.nan) if isinstance(ns, dict) else np.nan,
                   "accuracy": float(acc),
                   "accuracy_summed": np.nan if summed is None else float(summed),
                   "accuracy_per_char": np.nan if per_char is None else float(per_char)})
  if not rows:
    raise InputError(f"{results_dir}: no usable results; problems:\n  " + "\n  ".join(problems))
  return check_results(pd.DataFrame(rows), results_dir), problems


_RESULTS_FILE = re.compile(r"results_.+\.json")


def _reruns(a: str, b: str) -> bool:
  """Two lm-eval 0.4 result files of one run folder (results_<date>.json each)."""
  return (os.path.dirname(a) == os.path.dirname(b)
          and all(_RESULTS_FILE.fullmatch(os.path.basename(p)) for p in (a, b)))




VALIDATION_TASK = "validation_ppl"   # the pseudo-task holding validation perplexity in exports
# Metric names in exported files: lm-eval's own where the convention is lm-eval's; the paper's
# length normalisation (per token of the model's tokenizer) has no lm-eval name.
EXPORT_METRICS = (("acc_per_token", "accuracy"), ("acc", "accuracy_summed"),
                  ("acc_norm", "accuracy_per_char"))
EXPORT_VERSION = 1.0


def export_lm_eval(results: pd.DataFrame, out_dir: str, models: Sequence[Any], *,
                   k_shot: int | None = None) -> list[str]:
  """Writes `results` (RESULT_COLUMNS) as lm-evaluation-harness 0.4 result files, one per
  checkpoint: out_dir/<ORG__NAME>/results_step<N>.json with the keys lm-eval's readers use
  (lm_eval.utils.make_table among them): "results" {task: {"alias", "<metric>,none",
  "<metric>_stderr,none"} for the metrics of EXPORT_METRICS, and "validation_ppl":
  {"perplexity,none"}}, "versions", "n-shot", "higher_is_better", "n-samples", "configs" (task,
  num_fewshot, output_type, metric_list, metadata.version), "config" {"model": "opt_jax",
  "model_args": "pretrained=<first alias or name>,revision=<HF revision or stepN>"}, model_name,
  model_name_sanitized. Standard errors are lm-eval's for a mean metric (`accuracy_stderr`; "N/A"
  with one example). `import_lm_eval(out_dir, models, tasks, metric="acc_per_token",
  ppl_task=VALIDATION_TASK)` reads the paper's accuracy back. models: suite models (name,
  aliases; revision(step) when they have one). Returns the paths."""
  from opt_jax import files  # pylint: disable=import-outside-toplevel
  by_name = {m.name: m for m in models}
  written = []
  for (name, step), group in results.groupby(["model", "step"], sort=True):
    m = by_name.get(name)
    pretrained = (m.aliases[0] if m is not None and m.aliases else name)
    revision = m.revision(int(step)) if m is not None and hasattr(m, "revision") else None
    if not revision or not re.fullmatch(r"(?:global_)?step[_-]?\d+", revision):
      revision = f"step{int(step)}"
    tasks: dict[str, Any] = {}
    n_samples, n_shot, versions, better, configs = {}, {}, {}, {}, {}
    for row in group.to_dict("records"):
      task = row["task"]
      entry: dict[str, Any] = {"alias": task}
      for metric, col in EXPORT_METRICS:
        v = row.get(col, np.nan)
        if pd.isna(v):
          continue
        se = accuracy_stderr(float(v), float(row.get("n", np.nan)))
        entry[f"{metric},none"] = float(v)
        entry[f"{metric}_stderr,none"] = se if np.isfinite(se) else "N/A"
      tasks[task] = entry
      used = [mt for mt, _ in EXPORT_METRICS if f"{mt},none" in entry]
      versions[task] = EXPORT_VERSION
      better[task] = {mt: True for mt in used}
      if not pd.isna(row.get("n", np.nan)):
        n_samples[task] = {"original": int(row["n"]), "effective": int(row["n"])}
      if k_shot is not None:
        n_shot[task] = int(k_shot)
      configs[task] = {"task": task, "output_type": "multiple_choice",
                       "num_fewshot": None if k_shot is None else int(k_shot),
                       "metric_list": [{"metric": mt, "aggregation": "mean",
                                        "higher_is_better": True} for mt in used],
                       "metadata": {"version": EXPORT_VERSION}}
    ppl = group["validation_ppl"].iloc[0]
    if not pd.isna(ppl):
      tasks[VALIDATION_TASK] = {"alias": VALIDATION_TASK, "perplexity,none": float(ppl),
                                "perplexity_stderr,none": "N/A"}
      versions[VALIDATION_TASK] = EXPORT_VERSION
      n_shot[VALIDATION_TASK] = 0   # older make_table versions index n-shot by every task
      better[VALIDATION_TASK] = {"perplexity": False}
      configs[VALIDATION_TASK] = {"task": VALIDATION_TASK, "output_type": "loglikelihood_rolling",
                                  "metric_list": [{"metric": "perplexity", "aggregation":
                                                   "perplexity", "higher_is_better": False}],
                                  "metadata": {"version": EXPORT_VERSION}}
    sanitized = pretrained.replace("/", "__")
    data = {"results": tasks, "group_subtasks": {t: [] for t in tasks}, "configs": configs,
            "versions": versions, "n-shot": n_shot, "higher_is_better": better,
            "n-samples": n_samples,
            "config": {"model": "opt_jax",
                       "model_args": f"pretrained={pretrained},revision={revision}"},
            "model_name": pretrained, "model_name_sanitized": sanitized}
    path = os.path.join(out_dir, sanitized, f"results_step{int(step)}.json")
    files.write_json(path, data)
    written.append(path)
  return written


# The whole analysis and its report ---------------------------------------------------------------

@dataclasses.dataclass
class Analysis:
  """Everything the report and plots need; `tables` gives the CSVs.

  means: mean_accuracy(); correlations: the y = accuracy rows of correlations_by_metric (every y
  of ACCURACY_YS and OPTION_YS against X_COLUMNS, with bootstrap intervals); comparisons:
  bootstrap_correlations()'s comparison of validation perplexity with the other predictors;
  residuals: residuals_by_model() around the pooled perplexity fit; ranges: ppl_ranges();
  groups, group_tasks: group_curves() of the paper's task groups; final_options:
  final_option_ppl(); scaling, top_*: the automatic linearity / breakthroughness scores.
  """
  results: pd.DataFrame
  tasks: list[str]
  means: pd.DataFrame
  correlations: pd.DataFrame
  correlations_by_metric: pd.DataFrame
  comparisons: pd.DataFrame
  residuals: pd.DataFrame
  ranges: pd.DataFrame
  groups: pd.DataFrame
  group_tasks: dict[str, list[str]]
  final_options: pd.DataFrame
  scaling: pd.DataFrame
  top_linearity: list[str]
  top_breakthroughness: list[str]

  def tables(self) -> dict[str, pd.DataFrame]:
    """{file stem: table} of the CSVs written beside icl_results.csv."""
    return {"mean_accuracy": self.means, "correlations": self.correlations,
            "correlations_by_metric": self.correlations_by_metric,
            "predictor_comparison": self.comparisons, "residuals_by_model": self.residuals,
            "task_groups": self.groups, "final_option_ppl": self.final_options,
            "task_scaling": self.scaling}


def analyze(results: pd.DataFrame, *, groups: Mapping[str, Sequence[str]] | None = None,
            n_bins: int | None = 10, top_k: int = 5, replicates: int = BOOTSTRAP_REPLICATES,
            seed: int = 0, ema_weight: float = EMA_WEIGHT) -> Analysis:
  """All statistics of one results table (one k-shot setting); see the module docstring. groups:
  named task lists (default: none; the binary passes the paper's)."""
  results = check_results(results)
  tasks = common_tasks(results)
  means = mean_accuracy(results, tasks)
  ys = [y for y in ACCURACY_YS + OPTION_YS if means[y].notna().any()]
  point = pd.concat([correlations(means, y) for y in ys], ignore_index=True)
  intervals, comparisons = bootstrap_correlations(results, means, tasks, ys,
                                                  replicates=replicates, seed=seed)
  by_metric = point.merge(intervals.drop(columns=["n"]), on=["y", "x"], how="left")
  group_table, used = group_curves(results, groups or {}, ema_weight)
  scaling = task_scaling(results[results["task"].isin(tasks)], "accuracy", "validation_ppl", n_bins)
  return Analysis(results, tasks, means,
                  by_metric[by_metric["y"] == "accuracy"].reset_index(drop=True), by_metric,
                  comparisons, residuals_by_model(means), ppl_ranges(means), group_table, used,
                  final_option_ppl(means), scaling, top_tasks(scaling, "linearity", top_k),
                  top_tasks(scaling, "breakthroughness", top_k))


def _fmt(v: float, spec: str = ".3f") -> str:
  return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def _ci(lo: float, hi: float, spec: str = ".3f") -> str:
  return "n/a" if not (np.isfinite(lo) and np.isfinite(hi)) else f"[{lo:{spec}}, {hi:{spec}}]"


def _stat(r: Mapping[str, Any]) -> str:
  """'rho R [lo, hi], R^2 Q [lo, hi] (n = N)' of one correlations row."""
  return (f"rho {_fmt(r['spearman'])} {_ci(r['spearman_lo'], r['spearman_hi'])}, R^2 "
          f"{_fmt(r['r2'])} {_ci(r['r2_lo'], r['r2_hi'])} (n = {int(r['n'])})")


X_NAMES = {"validation_ppl": "validation perplexity", "flops": "FLOPs", "params": "parameters"}


def headline(a: Analysis, k_shot: int | None) -> list[str]:
  """Mean accuracy against each predictor: rho and R^2 with their 95% bootstrap intervals and n
  (or why there is none)."""
  c = a.correlations.set_index("x")
  shots = f"{k_shot}-shot " if k_shot is not None else ""
  n_ckpt = a.means.shape[0]
  if not np.isfinite(c.loc["validation_ppl", "r2"]):
    head = (f"mean {shots}accuracy over {len(a.tasks)} tasks and {n_ckpt} checkpoints: "
            f"{_fmt(a.means['accuracy'].min())} to {_fmt(a.means['accuracy'].max())}; "
            f"no validation perplexity, so no perplexity correlation")
  else:
    head = (f"mean {shots}accuracy over {len(a.tasks)} tasks vs log validation perplexity: "
            f"{_stat(c.loc['validation_ppl'])}; 95% bootstrap intervals")
  others = "; ".join(f"log {X_NAMES[x]}: {_stat(c.loc[x])}" for x in ("flops", "params")
                     if x in c.index)
  return [head, f"against {others}"] if others else [head]


def verdict(a: Analysis) -> list[str]:
  """Sentences saying what the numbers say about the paper's claim (perplexity predicts ICL
  accuracy better than size or compute, independently of size); each claim only where its
  interval or range supports it."""
  c = a.correlations.set_index("x")
  if not np.isfinite(c.loc["validation_ppl", "r2"]):
    return ["No validation perplexity is known for enough checkpoints: the paper's claim cannot be "
            "tested on these results (give --validation_ppl or --validation_text)."]
  out = [f"Mean accuracy ({len(a.tasks)} tasks, {a.means['model'].nunique()} sizes) against log "
         + "; against log ".join(f"{X_NAMES[x]}: {_stat(c.loc[x])}" for x in X_COLUMNS)
         + " (95% bootstrap intervals over checkpoints and tasks)."]
  comp = a.comparisons[a.comparisons["y"] == "accuracy"].set_index("x")
  comp = comp[np.isfinite(comp["r2_diff_lo"])]
  if comp.empty:
    out.append("No other predictor can be compared with validation perplexity here (too few "
               "checkpoints, or a constant predictor): no predictor is called best.")
  else:
    said = "; ".join(f"{X_NAMES[x]}: {_fmt(r['r2_diff'])} {_ci(r['r2_diff_lo'], r['r2_diff_hi'])}"
                     for x, r in comp.iterrows())
    n = int(comp["n"].iloc[0])
    lead = f"R^2(validation perplexity) - R^2(x) on {n} checkpoints, {said}: "
    beaten = [X_NAMES[x] for x, r in comp.iterrows() if r["r2_diff_hi"] < 0]
    if (comp["r2_diff_lo"] > 0).all():
      out.append(lead + "every interval lies above 0, so validation perplexity is the best "
                 "predictor of these, as the paper claims.")
    elif beaten:
      verb = "predicts" if len(beaten) == 1 else "predict"
      out.append(lead + f"{' and '.join(beaten)} {verb} accuracy better than validation "
                 f"perplexity here, unlike in the paper.")
    else:
      out.append(lead + "an interval includes 0, so the bootstrap does not separate validation "
                 "perplexity from the other predictors: no predictor is called best.")
  rho = c.loc["validation_ppl", "spearman"]
  if np.isfinite(c.loc["validation_ppl", "spearman_lo"]) and c.loc["validation_ppl",
                                                                   "spearman_lo"] > 0:
    out.append("Accuracy rises with perplexity here (the whole interval of rho is positive), the "
               "opposite of the paper's finding.")
  elif np.isfinite(rho) and rho > 0:
    out.append("rho is positive here, but its interval includes 0.")
  above = a.means["accuracy_above_random"]
  if above.notna().any() and above.max() < 0.02:
    out.append(f"Mean accuracy never exceeds the random baseline by 2 points (max "
               f"{_fmt(above.max())}): the models are at chance, so these correlations mostly "
               f"reflect noise and say little about the claim.")
  if a.means["model"].nunique() < 2:
    out.append("Only one size: independence from size cannot be tested.")
    return out
  ranges = "; ".join(f"{r['model']} {r['ppl_min']:.4g}-{r['ppl_max']:.4g}"
                     for _, r in a.ranges.iterrows())
  pairs = overlapping_pairs(a.ranges)
  if not pairs:
    out.append(f"No overlap: the sizes' validation perplexity ranges do not meet ({ranges}), so "
               f"no two sizes are seen at equal perplexity and independence from size cannot be "
               f"judged here.")
  elif not (c.loc["validation_ppl", "spearman_hi"] < 0 or c.loc["validation_ppl",
                                                                 "spearman_lo"] > 0):
    out.append(f"Validation perplexity ranges ({ranges}) overlap, but the interval of rho with "
               f"perplexity includes 0: perplexity does not explain accuracy here, so the "
               f"residuals around its fit say nothing about size.")
  elif len(a.residuals):
    sizes = {m for pair in pairs for m in pair}
    apart = [(p, q) for p, q in overlapping_pairs(a.ranges, overlap=False)]
    res = a.residuals[a.residuals["model"].isin(sizes)]
    worst = res.loc[res["mean_residual"].abs().idxmax()]
    spread = float(a.means["accuracy"].max() - a.means["accuracy"].min())
    size = abs(float(worst["mean_residual"]))
    said = (f"Validation perplexity ranges ({ranges}) overlap for "
            f"{', '.join(f'{p}/{q}' for p, q in pairs)}"
            + (f"; no overlap for {', '.join(f'{p}/{q}' for p, q in apart)}" if apart else "")
            + f". Around the pooled perplexity fit the largest mean residual of those sizes is "
            f"{_fmt(size)} ({worst['model']}), against a spread of {_fmt(spread)} in mean "
            f"accuracy: ")
    if spread > 0 and size < 0.1 * spread:
      out.append(said + "sizes at equal perplexity reach similar accuracy (independent of size, "
                 "as the paper finds).")
    else:
      out.append(said + "at equal perplexity the sizes differ noticeably, so size matters beyond "
                 "perplexity here.")
  return out


def summary_markdown(a: Analysis, *, title: str = "Downstream in-context learning",
                     notes: Sequence[str] = (), failures: Mapping[str, str] | None = None,
                     dropped: Mapping[str, str] | None = None) -> str:
  """summary.md: notes, the verdict on the paper's claim, correlation tables with their intervals,
  residuals, the task groups, correct vs incorrect options, the automatic linearity and
  breakthroughness scores, failed tasks and tasks not selected (each with its reason)."""
  lines = [f"# {title}", ""]
  lines += [f"- {n}" for n in notes]
  lines += [f"- {len(a.tasks)} tasks at every checkpoint; {a.means.shape[0]} checkpoints of "
            f"{a.means['model'].nunique()} sizes.",
            "- accuracy: the option with the highest mean log-prob per token (the paper's); "
            "accuracy_summed: highest summed log-prob (lm-eval's acc); accuracy_per_char: highest "
            "log-prob per character (lm-eval's acc_norm).", ""]
  lines += ["## What predicts mean accuracy", ""] + verdict(a) + [""]
  lines += ["| y | x | Spearman rho | 95% interval | p | R^2 (y ~ log x) | 95% interval | n |",
            "|---|---|---|---|---|---|---|---|"]
  for _, r in a.correlations_by_metric.iterrows():
    lines.append(f"| {r['y']} | {r['x']} | {_fmt(r['spearman'])} | "
                 f"{_ci(r['spearman_lo'], r['spearman_hi'])} | {_fmt(r['spearman_p'], '.2g')} | "
                 f"{_fmt(r['r2'])} | {_ci(r['r2_lo'], r['r2_hi'])} | {int(r['n'])} |")
  lines.append("")
  lines += ["Intervals: 95% percentile bootstrap over checkpoints and tasks "
            f"({BOOTSTRAP_REPLICATES} replicates). Above-random accuracy is raw accuracy minus a "
            "constant (the same tasks at every checkpoint), so its point statistics equal the raw "
            "ones.", ""]
  comp = a.comparisons[a.comparisons["y"] == "accuracy"]
  if len(comp):
    lines += ["| x | R^2(validation ppl) - R^2(x) | 95% interval | abs rho(ppl) - abs rho(x) | "
              "95% interval | n |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['x']} | {_fmt(r['r2_diff'])} | {_ci(r['r2_diff_lo'], r['r2_diff_hi'])} | "
              f"{_fmt(r['rho_diff'])} | {_ci(r['rho_diff_lo'], r['rho_diff_hi'])} | {int(r['n'])} |"
              for _, r in comp.iterrows()]
    lines.append("")
  if len(a.residuals):
    lines += ["## Residuals by size around the pooled perplexity fit", "",
              "| model | validation ppl range | mean residual | max abs residual | n |",
              "|---|---|---|---|---|"]
    rng = a.ranges.set_index("model")
    for _, r in a.residuals.iterrows():
      span = (f"{rng.loc[r['model'], 'ppl_min']:.4g}-{rng.loc[r['model'], 'ppl_max']:.4g}"
              if r["model"] in rng.index else "n/a")
      lines.append(f"| {r['model']} | {span} | {_fmt(r['mean_residual'], '+.4f')} | "
                   f"{_fmt(r['max_abs_residual'], '.4f')} | {int(r['n'])} |")
    lines.append("")
  lines += ["## The paper's task groups (Table 9)", ""] if a.group_tasks else []
  for group, used in a.group_tasks.items():
    g = a.groups[a.groups["group"] == group] if len(a.groups) else a.groups
    if not used or g.empty:
      lines.append(f"- {group}: none of its tasks at every checkpoint here")
      continue
    first, last = g.sort_values("validation_ppl", ascending=False).iloc[[0, -1]].to_dict("records")
    lines.append(f"- {group} ({len(used)} tasks: {', '.join(used)}): mean accuracy "
                 f"{_fmt(first['accuracy'])} at the highest validation perplexity "
                 f"({_fmt(first['validation_ppl'], '.4g')}, {first['model']}) and "
                 f"{_fmt(last['accuracy'])} at the lowest ({_fmt(last['validation_ppl'], '.4g')}, "
                 f"{last['model']}); random {_fmt(g['random_baseline'].mean())}")
  lines += [""] if a.group_tasks else []
  if a.final_options["correct_option_ppl"].notna().any():
    lines += ["## Correct vs incorrect options at each size's last checkpoint", "",
              "| model | params | step | correct option ppl | incorrect option ppl |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {int(r['params'])} | {int(r['step'])} | "
              f"{_fmt(r['correct_option_ppl'], '.4g')} | {_fmt(r['incorrect_option_ppl'], '.4g')} |"
              for _, r in a.final_options.iterrows()]
    lines.append("")
  gap = a.correlations_by_metric
  gap = gap[(gap["y"] == "log_option_ppl_gap") & (gap["x"] == "validation_ppl")]
  if len(gap) and np.isfinite(gap["spearman"].iloc[0]):
    r = gap.iloc[0]
    if np.isfinite(r["spearman_hi"]) and r["spearman_hi"] < 0:
      what = ("The gap widens as perplexity falls (the whole interval is negative): the correct "
              "options' perplexity drops faster than the incorrect ones' (the paper's account of "
              "the accuracy gains).")
    elif np.isfinite(r["spearman_lo"]) and r["spearman_lo"] > 0:
      what = ("The gap narrows as perplexity falls (the whole interval is positive), unlike in "
              "the paper.")
    else:
      what = "The interval includes 0: no trend of the gap with perplexity is established."
    lines += [f"Spearman rho between validation perplexity and log(incorrect-option ppl / "
              f"correct-option ppl): {_fmt(r['spearman'])} "
              f"{_ci(r['spearman_lo'], r['spearman_hi'])} (n = {int(r['n'])}). {what}", ""]
  lines += ["## Linearity and breakthroughness scores (BIG-bench definitions, ordered by "
            "perplexity; an extra table, task_scaling.csv)", "",
            f"Top linearity: {', '.join(a.top_linearity) or '-'}",
            "", f"Top breakthroughness: {', '.join(a.top_breakthroughness) or '-'}", ""]
  if failures:
    lines += ["## Tasks that failed", ""] + [f"- {k}: {v}" for k, v in sorted(failures.items())]
    lines.append("")
  if dropped:
    lines += ["## BIG-bench tasks not selected by the paper's rule", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(dropped.items())] + [""]
  return "\n".join(lines)
