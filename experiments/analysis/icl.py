"""In-context learning metrics and what predicts them: pure numpy/pandas/scipy (no JAX).

Per (model, step, task), from each option's summed log-prob (nats), token count and character count:
  accuracy              the option with the highest summed log-prob has the top target score
  accuracy_norm         the same with log-prob / characters of the continuation as scored (the
                        harness's acc_norm convention, tokenizer independent; the characters include
                        the leading whitespace the boundary convention moves into the continuation)
  correct_option_ppl    exp(mean over examples of the correct option's per-token NLL)
  incorrect_option_ppl  exp(mean over examples of the mean per-token NLL of the other options)
                        (both are geometric means of per-option perplexities: robust to the odd huge
                        one)
  random_baseline       mean over examples of 1 / (number of options)

The table `icl_results.csv` (one row per model, step, task) has the columns RESULT_COLUMNS. Another
source (lm-evaluation-harness files, another framework) can feed the same analysis with a CSV of
those columns: model, step, params, tokens, flops, validation_ppl, task and accuracy are required;
n, accuracy_norm, correct_option_ppl, incorrect_option_ppl and random_baseline may be empty (NaN),
which skips what needs them (above-random accuracy needs random_baseline).

Across checkpoints (`mean_accuracy`, `correlations`): mean accuracy over the tasks every checkpoint
has, raw and above random (accuracy - random_baseline, averaged over tasks), against
x in (validation_ppl, flops, params), pooled over every size and step: Spearman's rho (scipy) and
the R^2 of the least-squares line accuracy = a + b log(x). Rows whose x is missing or not positive
(FLOPs at step 0) are left out of that x's statistics; n says how many remained. Above-random
accuracy differs from raw accuracy by a constant when every checkpoint has the same tasks, so its
rho and R^2 are the same; both are reported.

Per task (`task_scaling`), following the BIG-bench paper (Srivastava et al. 2022, appendix on
linearity and breakthroughness), for scores y_1..y_n ordered by scale (here: by decreasing
validation perplexity, optionally averaged within `n_bins` quantile bins of log perplexity):
  I(y) = sign(argmax_i y_i - argmin_i y_i) * (max_i y_i - min_i y_i)     overall improvement
  L(y) = I(y) / sqrt(mean_i (y_{i+1} - y_i)^2)                          linearity
  B(y) = I(y) / sqrt(median_i (y_{i+1} - y_i)^2)                        breakthroughness
L is largest when the improvement is spread evenly over the steps, B when it comes in a few jumps
(a median of zero with I > 0 gives B = inf). Flat curves (I = 0) get 0 for both. For tasks scored
at the same points, dividing by the root of the sum instead of the mean (another reading of the
appendix) only rescales L by sqrt(n - 1) and leaves the ranking of tasks unchanged.
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
                  "accuracy", "accuracy_norm", "correct_option_ppl", "incorrect_option_ppl",
                  "random_baseline")
REQUIRED_COLUMNS = ("model", "step", "params", "tokens", "flops", "validation_ppl", "task",
                    "accuracy")
X_COLUMNS = ("validation_ppl", "flops", "params")
CHECKPOINT_COLUMNS = ("model", "step", "params", "tokens", "flops", "validation_ppl")


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
  Returns n, accuracy, accuracy_norm, correct_option_ppl, incorrect_option_ppl, random_baseline.
  Ties in log-prob go to the first option (numpy argmax).
  """
  n = len(logprobs)
  if n == 0:
    raise ValueError("task_metrics needs at least one example")
  hit, hit_norm, nll_c, nll_i = [], [], [], []
  for e, (lp, nt, nc, sc) in enumerate(zip(logprobs, n_tokens, n_chars, scores)):
    lp, nt, nc, sc = (np.asarray(a, np.float64) for a in (lp, nt, nc, sc))
    if not (lp.shape == nt.shape == nc.shape == sc.shape) or lp.size < 2:
      raise ValueError(f"example {e}: expected the same number (>= 2) of log-probs, token counts, "
                       f"character counts and scores, got {lp.size}, {nt.size}, {nc.size}, "
                       f"{sc.size}")
    if (nt < 1).any() or (nc < 1).any():
      raise ValueError(f"example {e}: every option needs at least one token and one character")
    top = sc == sc.max()
    hit.append(top[np.argmax(lp)])
    hit_norm.append(top[np.argmax(lp / nc)])
    per_token = -lp / nt
    c = int(np.argmax(sc))
    nll_c.append(per_token[c])
    nll_i.append(np.delete(per_token, c).mean())
  return {"n": n, "accuracy": float(np.mean(hit)), "accuracy_norm": float(np.mean(hit_norm)),
          "correct_option_ppl": float(np.exp(np.mean(nll_c))),
          "incorrect_option_ppl": float(np.exp(np.mean(nll_i))),
          "random_baseline": random_baseline([len(s) for s in scores])}


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


def mean_accuracy(results: pd.DataFrame, tasks: Sequence[str] | None = None) -> pd.DataFrame:
  """One row per (model, step): CHECKPOINT_COLUMNS, n_tasks, accuracy, accuracy_norm,
  accuracy_above_random (mean over `tasks`, default `common_tasks`), correct_option_ppl and
  incorrect_option_ppl (geometric means over tasks)."""
  tasks = common_tasks(results) if tasks is None else list(tasks)
  if not tasks:
    raise InputError("no task has an accuracy at every checkpoint; nothing to average")
  df = results[results["task"].isin(tasks)].copy()
  df["accuracy_above_random"] = df["accuracy"] - df["random_baseline"]
  for c in ("correct_option_ppl", "incorrect_option_ppl"):
    df["log_" + c] = np.log(df[c])
  g = df.groupby(["model", "step"], sort=True)
  out = g[list(CHECKPOINT_COLUMNS[2:])].first()
  out["n_tasks"] = g["task"].nunique()
  for c in ("accuracy", "accuracy_norm", "accuracy_above_random"):
    out[c] = g[c].mean()
  for c in ("correct_option_ppl", "incorrect_option_ppl"):
    out[c] = np.exp(g["log_" + c].mean())
  return out.reset_index()


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
  accuracy = `metric`; accuracy_norm = `metric`_norm when present; validation_ppl = ppl_task's
  ppl_metric (default: the first of PPL_METRICS present). n is lm-eval's n-samples when recorded.
  Option perplexities and random baselines are unknown (NaN).

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
      norm = _metric(results[task], metric + "_norm")
      ns = n_samples.get(task, {}) if isinstance(n_samples, dict) else {}
      rows.append({"model": model.name, "step": step, "params": model.params, "tokens": tokens,
                   "flops": 6.0 * model.params * tokens, "validation_ppl": ppl, "task": task,
                   "n": ns.get("effective", np.nan) if isinstance(ns, dict) else np.nan,
                   "accuracy": float(acc), "accuracy_norm": np.nan if norm is None else float(norm),
                   "correct_option_ppl": np.nan, "incorrect_option_ppl": np.nan,
                   "random_baseline": np.nan})
  if not rows:
    raise InputError(f"{results_dir}: no usable results; problems:\n  " + "\n  ".join(problems))
  return check_results(pd.DataFrame(rows), results_dir), problems


_RESULTS_FILE = re.compile(r"results_.+\.json")


def _reruns(a: str, b: str) -> bool:
  """Two lm-eval 0.4 result files of one run folder (results_<date>.json each)."""
  return (os.path.dirname(a) == os.path.dirname(b)
          and all(_RESULTS_FILE.fullmatch(os.path.basename(p)) for p in (a, b)))


VALIDATION_TASK = "validation_ppl"   # the pseudo-task holding validation perplexity in exports


def export_lm_eval(results: pd.DataFrame, out_dir: str, models: Sequence[Any], *,
                   k_shot: int | None = None) -> list[str]:
  """Writes `results` (RESULT_COLUMNS) as lm-evaluation-harness 0.4 result files, one per
  checkpoint: out_dir/<ORG__NAME>/results_step<N>.json with "results" {task: {"alias", "acc,none",
  "acc_norm,none"}, "validation_ppl": {"perplexity,none"}}, "n-samples", "n-shot", and "config"
  {"model": "opt_jax", "model_args": "pretrained=<first alias or name>,revision=<HF revision or
  stepN>"}. `import_lm_eval(out_dir, models, tasks, ppl_task=VALIDATION_TASK)` reads them back.
  models: suite models (name, aliases; revision(step) when they have one). Returns the paths."""
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
    n_samples, n_shot = {}, {}
    for row in group.itertuples():
      entry = {"alias": row.task, "acc,none": float(row.accuracy)}
      if not pd.isna(row.accuracy_norm):
        entry["acc_norm,none"] = float(row.accuracy_norm)
      tasks[row.task] = entry
      if not pd.isna(row.n):
        n_samples[row.task] = {"original": int(row.n), "effective": int(row.n)}
      if k_shot is not None:
        n_shot[row.task] = int(k_shot)
    ppl = group["validation_ppl"].iloc[0]
    if not pd.isna(ppl):
      tasks[VALIDATION_TASK] = {"alias": VALIDATION_TASK, "perplexity,none": float(ppl)}
    sanitized = pretrained.replace("/", "__")
    data = {"results": tasks, "n-shot": n_shot, "n-samples": n_samples,
            "config": {"model": "opt_jax",
                       "model_args": f"pretrained={pretrained},revision={revision}"},
            "model_name": pretrained, "model_name_sanitized": sanitized}
    path = os.path.join(out_dir, sanitized, f"results_step{int(step)}.json")
    files.write_json(path, data)
    written.append(path)
  return written


# The whole analysis and its report ---------------------------------------------------------------

ACCURACY_YS = ("accuracy", "accuracy_above_random", "accuracy_norm")


@dataclasses.dataclass
class Analysis:
  """Everything the report and plots need; `tables` gives the CSVs.

  means: mean_accuracy(); correlations: y = accuracy rows (the correlations.csv of the issue);
  correlations_by_metric: every y of ACCURACY_YS and the option perplexities; residuals:
  residuals_by_model() around the pooled perplexity fit; scaling: task_scaling().
  """
  results: pd.DataFrame
  tasks: list[str]
  means: pd.DataFrame
  correlations: pd.DataFrame
  correlations_by_metric: pd.DataFrame
  residuals: pd.DataFrame
  scaling: pd.DataFrame
  top_linearity: list[str]
  top_breakthroughness: list[str]

  def tables(self) -> dict[str, pd.DataFrame]:
    """{file stem: table} of the CSVs written beside icl_results.csv."""
    return {"mean_accuracy": self.means, "correlations": self.correlations,
            "correlations_by_metric": self.correlations_by_metric,
            "residuals_by_model": self.residuals, "task_scaling": self.scaling}


def analyze(results: pd.DataFrame, *, n_bins: int | None = 10, top_k: int = 5) -> Analysis:
  """All statistics of one results table (one k-shot setting); see the module docstring."""
  results = check_results(results)
  tasks = common_tasks(results)
  means = mean_accuracy(results, tasks)
  means["log_option_ppl_gap"] = (np.log(means["incorrect_option_ppl"])
                                 - np.log(means["correct_option_ppl"]))
  ys = [y for y in ACCURACY_YS + ("correct_option_ppl", "incorrect_option_ppl",
                                   "log_option_ppl_gap") if means[y].notna().any()]
  by_metric = pd.concat([correlations(means, y) for y in ys], ignore_index=True)
  scaling = task_scaling(results[results["task"].isin(tasks)], "accuracy", "validation_ppl", n_bins)
  return Analysis(results, tasks, means, by_metric[by_metric["y"] == "accuracy"].reset_index(
      drop=True), by_metric, residuals_by_model(means), scaling,
      top_tasks(scaling, "linearity", top_k), top_tasks(scaling, "breakthroughness", top_k))


def headline(a: Analysis, k_shot: int | None) -> list[str]:
  """One line: Spearman rho and R^2 of mean accuracy with each predictor (or why there is none)."""
  c = a.correlations.set_index("x")
  shots = f"{k_shot}-shot " if k_shot is not None else ""
  n_ckpt = a.means.shape[0]
  if not np.isfinite(c.loc["validation_ppl", "r2"]):
    head = (f"mean {shots}accuracy over {len(a.tasks)} tasks and {n_ckpt} checkpoints: "
            f"{_fmt(a.means['accuracy'].min())} to {_fmt(a.means['accuracy'].max())}; "
            f"no validation perplexity, so no perplexity correlation")
  else:
    v = c.loc["validation_ppl"]
    head = (f"mean {shots}accuracy vs log validation perplexity: Spearman rho "
            f"{_fmt(v['spearman'])}, R^2 {_fmt(v['r2'])} (n = {int(v['n'])})")
  others = "; ".join(f"log {name}: rho {_fmt(c.loc[x, 'spearman'])}, R^2 {_fmt(c.loc[x, 'r2'])}"
                     for x, name in (("flops", "FLOPs"), ("params", "parameters")) if x in c.index)
  return [head, f"against {others}"] if others else [head]


def _fmt(v: float, spec: str = ".3f") -> str:
  return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def verdict(a: Analysis) -> list[str]:
  """Sentences saying what the correlations say about the paper's claim (perplexity predicts
  ICL accuracy better than size or compute, independently of size)."""
  c = a.correlations.set_index("x")
  r2 = {x: c.loc[x, "r2"] for x in X_COLUMNS}
  rho = {x: c.loc[x, "spearman"] for x in X_COLUMNS}
  out = []
  if not np.isfinite(r2["validation_ppl"]):
    return ["No validation perplexity is known for enough checkpoints: the paper's claim cannot be "
            "tested on these results (give --validation_ppl or --validation_text)."]
  others = [x for x in ("flops", "params") if np.isfinite(r2[x])]
  beaten = [x for x in others if r2[x] >= r2["validation_ppl"]]
  out.append(
      f"Mean accuracy against log validation perplexity: Spearman rho = "
      f"{_fmt(rho['validation_ppl'])}, R^2 = {_fmt(r2['validation_ppl'])}; against log FLOPs: rho "
      f"= {_fmt(rho['flops'])}, R^2 = {_fmt(r2['flops'])}; against log parameters: rho = "
      f"{_fmt(rho['params'])}, R^2 = {_fmt(r2['params'])} (n = {int(c.loc['validation_ppl', 'n'])}"
      f" checkpoints pooled over {a.means['model'].nunique()} sizes).")
  if not beaten and others:
    out.append("Validation perplexity is the best predictor of the three, as the paper claims.")
  elif beaten:
    out.append(f"Validation perplexity is not the best predictor here: "
               f"{' and '.join(beaten)} explain(s) at least as much variance. These results do not "
               f"support the paper's claim.")
  if np.isfinite(rho["validation_ppl"]) and rho["validation_ppl"] > 0:
    out.append("Accuracy rises with perplexity here (positive rho), the opposite of the paper's "
               "finding.")
  above = a.means["accuracy_above_random"]
  if above.notna().any() and above.max() < 0.02:
    out.append(f"Mean accuracy never exceeds the random baseline by 2 points (max "
               f"{_fmt(above.max())}): the models are at chance, so these correlations mostly "
               f"reflect noise and say little about the claim.")
  if a.means["model"].nunique() < 2:
    out.append("Only one size: independence from size cannot be tested.")
  elif len(a.residuals):
    worst = a.residuals.loc[a.residuals["mean_residual"].abs().idxmax()]
    spread = float(a.means["accuracy"].max() - a.means["accuracy"].min())
    size = abs(float(worst["mean_residual"]))
    said = (f"Around the pooled perplexity fit the largest per-size mean residual is "
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
  """summary.md: notes, the verdict on the paper's claim, correlation and residual tables,
  linearity and breakthroughness, failed tasks and tasks not selected (each with its reason)."""
  lines = [f"# {title}", ""]
  lines += [f"- {n}" for n in notes]
  lines += [f"- {len(a.tasks)} tasks at every checkpoint; {a.means.shape[0]} checkpoints of "
            f"{a.means['model'].nunique()} sizes.", ""]
  lines += ["## What predicts mean accuracy", ""] + verdict(a) + [""]
  lines += ["| y | x | Spearman rho | p | R^2 (y ~ log x) | n |", "|---|---|---|---|---|---|"]
  for _, r in a.correlations_by_metric.iterrows():
    lines.append(f"| {r['y']} | {r['x']} | {_fmt(r['spearman'])} | {_fmt(r['spearman_p'], '.2g')} "
                 f"| {_fmt(r['r2'])} | {int(r['n'])} |")
  lines.append("")
  if (a.correlations_by_metric["y"] == "accuracy_above_random").any():
    lines += ["Above-random accuracy is raw accuracy minus a constant (the same tasks at every "
              "checkpoint), so its statistics equal the raw ones.", ""]
  if len(a.residuals):
    lines += ["## Residuals by size around the pooled perplexity fit", "",
              "| model | mean residual | max abs residual | n |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {_fmt(r['mean_residual'], '+.4f')} | "
              f"{_fmt(r['max_abs_residual'], '.4f')} | {int(r['n'])} |"
              for _, r in a.residuals.iterrows()]
    lines.append("")
  gap = a.correlations_by_metric
  gap = gap[(gap["y"] == "log_option_ppl_gap") & (gap["x"] == "validation_ppl")]
  if len(gap) and np.isfinite(gap["spearman"].iloc[0]):
    rho, p = gap["spearman"].iloc[0], gap["spearman_p"].iloc[0]
    if rho < 0 and p < 0.05:
      what = ("The gap widens as perplexity falls: the correct options' perplexity drops faster "
              "than the incorrect ones' (the paper's account of the accuracy gains).")
    elif rho > 0 and p < 0.05:
      what = "The gap narrows as perplexity falls, unlike in the paper."
    else:
      what = "No significant trend of the gap with perplexity (p >= 0.05)."
    lines += ["## Correct vs incorrect options", "",
              f"Spearman rho between validation perplexity and log(incorrect-option ppl / "
              f"correct-option ppl): {_fmt(rho)} (p = {_fmt(p, '.2g')}). {what}", ""]
  lines += ["## Linearity and breakthroughness (BIG-bench definitions, ordered by perplexity)", "",
            f"Top linearity: {', '.join(a.top_linearity) or '-'}",
            "", f"Top breakthroughness: {', '.join(a.top_breakthroughness) or '-'}", ""]
  if failures:
    lines += ["## Tasks that failed", ""] + [f"- {k}: {v}" for k, v in sorted(failures.items())]
    lines.append("")
  if dropped:
    lines += ["## BIG-bench tasks not selected by the paper's rule", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(dropped.items())] + [""]
  return "\n".join(lines)
