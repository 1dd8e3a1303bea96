"""Token trajectories across model sizes: trend shares, tokens followed across sizes, agreement,
matched perplexity, double descent.

Inputs are per-token loss matrices (nats) of several models scored on one tokenised corpus
(`ModelTrajectories`); `analyze` turns them into tables (`Analysis`) and `summary_markdown` into
summary.md; the caller writes them, trajectory_plots.py draws them. Everything here is
numpy/pandas/scipy and writes no file. Never imports JAX.

The paper's analysis (Xia et al. 2023, section 3; each rule is one a reader can recompute from the
CSVs):

* Trend labels: trends.classify_trends on the per-token quantity (perplexity = exp(loss) by default,
  as in the paper; or the loss itself) for each start fraction: stagnated, upward, downward,
  unclassified (in no group), invalid.
* Group curve of a set of tokens at a checkpoint: exp(mean over the tokens of their loss), the
  geometric mean of their perplexities (notebook: exp of the mean log-likelihood). Tokens whose
  loss is non-finite at that checkpoint are left out of that checkpoint's mean.
* Tokens chosen by one size, followed in every size (Figures 3-4, middle and right): each
  reference size R labels its tokens at the selection fraction f of its own run; for each label,
  every size's group curve on those same tokens. The selection checkpoint is R's first kept one
  (nearest f x R's last step); the share selected is the label's share of all tokens.
* Double descent as the paper reads it: for the upward tokens of each reference R, each other
  size M's group curve after the selection point: M's checkpoints from the first whose validation
  perplexity is at or below R's at its selection checkpoint (when both are known; else from M's
  checkpoint nearest f x M's last step). With g = log of that curve, the curve rises then falls
  when some checkpoint k has max_{j<k} (g_k - g_j) >= d and max_{l>k} (g_k - g_l) >= d,
  d = log(1 + min_change); the k with the largest min of the two is the peak, the valley the
  lowest point before it and the end the lowest after it.

What opt_jax adds (extra outputs):

* Agreement of two sizes: over tokens valid in both, share of identical labels and Cohen's kappa
  over the four labels of valid tokens (kappa = (p_o - p_e) / (1 - p_e), p_e = sum_k p_a(k) p_b(k);
  NaN when p_e == 1, i.e. both sizes put every token in the same single label).
* Matched steps: both sizes labelled with the same start fraction of their own run.
* Matched validation perplexity: for sizes A and B with validation perplexities P_A, P_B over their
  checkpoints, the overlap is [lo, hi] = [max(min P_A, min P_B), min(max P_A, max P_B)]. Each size
  keeps exactly its checkpoints after step 0 with lo <= P <= hi (in step order; a non-monotone run
  may skip checkpoints inside its span) and is labelled by trends.fit_window over those
  checkpoints (normalised by the first kept one, OLS on log(step), the band over them). A pair
  with no overlap or with fewer than 3 checkpoints in either window is reported with NaN
  agreement and the reason in `note`.
* Per-token double-descent detector: on the full run, the log of the quantity is smoothed with an
  exponential moving average over checkpoints (s_0 = v_0, s_t = ema * s_{t-1} + (1 - ema) * v_t;
  ema = 0 is no smoothing; in log space so one huge early perplexity does not dominate the
  average). A token shows double descent when there are checkpoints i < j < k < l with
  s_i - s_j >= d (fall), s_k - s_j >= d (rise) and s_k - s_l >= d (fall again),
  d = log(1 + min_rise): each move changes the smoothed quantity by at least a factor 1 + min_rise. It is reported among
  the upward tokens of each start fraction. Defaults (ema 0.7, min_rise 0.5) flag under 10% of
  pure-noise trajectories with iid per-checkpoint noise up to 0.3 nats over 40 checkpoints
  (tests/test_trends.py); lower them for smooth trajectories, raise them for noisy ones.
* The arithmetic mean of per-token perplexity of each group (`arithmetic_mean_ppl` in
  group_means.csv), beside the paper's geometric group curve.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from experiments.analysis import trends

QUANTITIES = ("perplexity", "loss")


@dataclasses.dataclass
class ModelTrajectories:
  """One model size scored on the corpus.

  losses: [num_tokens, num_checkpoints] per-token loss -log p (nats), float32.
  steps: [num_checkpoints] training steps, strictly increasing.
  tokens, flops, val_ppl: [num_checkpoints] tokens seen, training FLOPs and validation perplexity
  per checkpoint (None or NaN where unknown).
  """

  name: str
  steps: np.ndarray
  losses: np.ndarray
  tokens: np.ndarray | None = None
  flops: np.ndarray | None = None
  val_ppl: np.ndarray | None = None
  params: int | None = None

  def column(self, name: str) -> np.ndarray:
    """[num_checkpoints] float64 of `steps`, `tokens`, `flops` or `val_ppl`; NaN where unknown."""
    value = getattr(self, name)
    if value is None:
      return np.full(len(self.steps), np.nan)
    return np.asarray(value, dtype=np.float64)


def check_models(models: Sequence[ModelTrajectories]) -> None:
  """Raises ValueError naming the model at fault when the matrices cannot be compared."""
  if not models:
    raise ValueError("no models to analyse")
  names = [m.name for m in models]
  if len(set(names)) != len(names):
    raise ValueError(f"model names must be unique, got {names}")
  for m in models:
    losses = np.asarray(m.losses)
    steps = np.asarray(m.steps)
    if losses.ndim != 2 or steps.ndim != 1 or losses.shape[1] != steps.shape[0]:
      raise ValueError(f"model {m.name!r}: losses {losses.shape} must be [num_tokens, "
                       f"num_checkpoints] with one column per step ({steps.shape[0]} steps)")
    for field in ("tokens", "flops", "val_ppl"):
      value = getattr(m, field)
      if value is not None and np.shape(value) != steps.shape:
        raise ValueError(f"model {m.name!r}: {field} has shape {np.shape(value)}, expected one value "
                         f"per checkpoint {steps.shape}")
  counts = {m.name: np.shape(m.losses)[0] for m in models}
  if len(set(counts.values())) != 1:
    raise ValueError(f"mismatched token counts between sizes {counts}: every size must score the "
                     f"same corpus with the same tokenizer, context length and stride")
  if next(iter(counts.values())) == 0:
    raise ValueError("the loss matrices have no tokens (empty corpus?)")


def quantity_of(losses, quantity: str) -> np.ndarray:
  """[num_tokens, C] float64 per-token perplexity exp(loss), or the loss itself."""
  if quantity not in QUANTITIES:
    raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
  losses = np.asarray(losses, dtype=np.float64)
  return np.exp(losses) if quantity == "perplexity" else losses


# --- trend shares and agreement ---------------------------------------------------------------

def trend_percentages(fits: Mapping[str, trends.TrendFit]) -> pd.DataFrame:
  """Rows (model, label, count, percent) for every label; percent of all tokens, invalid included."""
  rows = []
  for name, fit in fits.items():
    counts = fit.counts()
    total = max(sum(counts.values()), 1)
    rows += [{"model": name, "label": label, "count": c, "percent": 100.0 * c / total}
             for label, c in counts.items()]
  return pd.DataFrame(rows, columns=["model", "label", "count", "percent"])


def label_agreement(codes_a, codes_b) -> dict:
  """Agreement of two labelings of the same tokens, over tokens valid in both.

  Returns {n_tokens, share_same, kappa}: Cohen's kappa over the four valid labels (stagnated,
  upward, downward, unclassified); NaN when no token is valid in both, kappa NaN when chance
  agreement is 1.
  """
  a = np.asarray(codes_a)
  b = np.asarray(codes_b)
  if a.shape != b.shape:
    raise ValueError(f"label arrays differ in shape: {a.shape} vs {b.shape}")
  both = (a != trends.INVALID) & (b != trends.INVALID)
  a, b = a[both].astype(np.int64), b[both].astype(np.int64)
  n = int(a.size)
  if n == 0:
    return {"n_tokens": 0, "share_same": math.nan, "kappa": math.nan}
  k = trends.INVALID  # the valid labels are codes 0 .. INVALID - 1
  table = np.zeros((k, k), np.int64)
  np.add.at(table, (a, b), 1)
  p_o = np.trace(table) / n
  p_e = float(table.sum(1) @ table.sum(0)) / n ** 2
  kappa = (p_o - p_e) / (1.0 - p_e) if p_e < 1.0 else math.nan
  return {"n_tokens": n, "share_same": float(p_o), "kappa": float(kappa)}


def pairwise_agreement(codes: Mapping[str, np.ndarray]) -> pd.DataFrame:
  """Rows (model_a, model_b, n_tokens, share_same, kappa) for every pair of sizes."""
  rows = [{"model_a": a, "model_b": b, **label_agreement(codes[a], codes[b])}
          for a, b in itertools.combinations(codes, 2)]
  return pd.DataFrame(rows, columns=["model_a", "model_b", "n_tokens", "share_same", "kappa"])


def matched_perplexity_windows(ppl_a, ppl_b):
  """Checkpoints of two sizes whose validation perplexity lies in the overlap of both runs.

  ppl_a: [C_a], ppl_b: [C_b] validation perplexity per checkpoint (NaN entries are ignored).
  Returns (mask_a [C_a] bool, mask_b [C_b] bool, lo, hi); masks are all False without overlap.
  """
  pa = np.asarray(ppl_a, dtype=np.float64)
  pb = np.asarray(ppl_b, dtype=np.float64)
  fa, fb = np.isfinite(pa), np.isfinite(pb)
  if not fa.any() or not fb.any():
    return np.zeros(pa.shape, bool), np.zeros(pb.shape, bool), math.nan, math.nan
  lo = max(pa[fa].min(), pb[fb].min())
  hi = min(pa[fa].max(), pb[fb].max())
  with np.errstate(invalid="ignore"):
    return fa & (pa >= lo) & (pa <= hi), fb & (pb >= lo) & (pb <= hi), float(lo), float(hi)


def matched_perplexity_agreement(models: Sequence[ModelTrajectories], *, quantity: str = "perplexity",
                                 alpha: float = 0.05) -> pd.DataFrame:
  """Agreement of every pair of sizes, each labelled over its checkpoints in the matched window.

  Rows: model_a, model_b, ppl_lo, ppl_hi, checkpoints_a, checkpoints_b (count in window),
  steps_a, steps_b ("first-last"), n_tokens, share_same, kappa, note.
  """
  rows = []
  # The fit uses log(step): step 0 (a suite's initialisation) is never in a matched window.
  fitted = {m.name: np.where(np.asarray(m.steps) > 0, m.column("val_ppl"), np.nan) for m in models}
  for ma, mb in itertools.combinations(models, 2):
    mask_a, mask_b, lo, hi = matched_perplexity_windows(fitted[ma.name], fitted[mb.name])
    row = {"model_a": ma.name, "model_b": mb.name, "ppl_lo": lo, "ppl_hi": hi,
           "checkpoints_a": int(mask_a.sum()), "checkpoints_b": int(mask_b.sum()),
           "steps_a": _span(np.asarray(ma.steps)[mask_a]),
           "steps_b": _span(np.asarray(mb.steps)[mask_b]),
           "n_tokens": 0, "share_same": math.nan, "kappa": math.nan, "note": ""}
    if math.isnan(lo):
      row["note"] = "validation perplexity unknown"
    elif lo > hi:
      row["note"] = f"no overlap: perplexity ranges do not meet ({hi:.4g} < {lo:.4g})"
    elif mask_a.sum() < 3 or mask_b.sum() < 3:
      row["note"] = "fewer than 3 checkpoints in a matched window"
    else:
      fit_a = trends.fit_window(quantity_of(np.asarray(ma.losses)[:, mask_a], quantity),
                                np.asarray(ma.steps)[mask_a], alpha)
      fit_b = trends.fit_window(quantity_of(np.asarray(mb.losses)[:, mask_b], quantity),
                                np.asarray(mb.steps)[mask_b], alpha)
      row.update(label_agreement(fit_a.codes, fit_b.codes))
    rows.append(row)
  columns = ["model_a", "model_b", "ppl_lo", "ppl_hi", "checkpoints_a", "checkpoints_b", "steps_a",
             "steps_b", "n_tokens", "share_same", "kappa", "note"]
  return pd.DataFrame(rows, columns=columns)


def _span(steps) -> str:
  steps = np.asarray(steps)
  return f"{int(steps[0])}-{int(steps[-1])}" if steps.size else ""


# --- double descent ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DoubleDescent:
  """found: [N] bool; valley, peak: [N] checkpoint index of the rise's start and top (-1 if none);
  rise: [N] relative rise of the smoothed quantity from valley to peak (exp(s_k - s_j) - 1; 0 if
  none)."""

  found: np.ndarray
  valley: np.ndarray
  peak: np.ndarray
  rise: np.ndarray


def ema_smooth(values, ema: float) -> np.ndarray:
  """[N, C] exponential moving average along checkpoints:
  s_0 = v_0, s_t = ema s_{t-1} + (1 - ema) v_t."""
  if not 0.0 <= ema < 1.0:
    raise ValueError(f"ema must be in [0, 1), got {ema}")
  v = np.asarray(values, dtype=np.float64)
  out = np.empty_like(v)
  if v.shape[1]:
    out[:, 0] = v[:, 0]
  for t in range(1, v.shape[1]):  # a loop over checkpoints, vectorised over tokens
    out[:, t] = ema * out[:, t - 1] + (1.0 - ema) * v[:, t]
  return out


def find_double_descent(values, *, ema: float = 0.7, min_rise: float = 0.5) -> DoubleDescent:
  """Fall, rise, fall again in each token's smoothed trajectory (module docstring has the rule).

  values: [N, C] per-token quantity (perplexity or loss) over the full run; rows with a non-finite
  or non-positive value are never double descent. O(N C) with prefix/suffix extrema.
  """
  if min_rise <= 0:
    raise ValueError(f"min_rise must be > 0, got {min_rise}")
  v = np.asarray(values, dtype=np.float64)
  if v.ndim != 2:
    raise ValueError(f"values must be [num_tokens, num_checkpoints], got shape {v.shape}")
  n, c = v.shape
  ok = np.all(np.isfinite(v) & (v > 0), axis=1)                      # [N]
  with np.errstate(divide="ignore", invalid="ignore"):
    s = ema_smooth(np.where(ok[:, None], np.log(v), 0.0), ema)        # [N, C]
  d = math.log1p(min_rise)
  inf = np.full((n, 1), np.inf)
  # prev_max[:, j] = max_{i<j} s_i; next_min[:, k] = min_{l>k} s_l (exclusive prefix/suffix).
  prev_max = np.concatenate([-inf, np.maximum.accumulate(s, axis=1)[:, :-1]], axis=1)
  next_min = np.concatenate([np.minimum.accumulate(s[:, ::-1], axis=1)[:, ::-1][:, 1:], inf], axis=1)
  fell_into = prev_max - s >= d                                        # [N, C] valley candidates j
  valleys = np.where(fell_into, s, np.inf)
  lowest_valley = np.concatenate([inf, np.minimum.accumulate(valleys, axis=1)[:, :-1]], axis=1)
  falls_after = s - next_min >= d                                      # [N, C] peak candidates k
  climb = np.where(falls_after, s - lowest_valley, -np.inf)            # [N, C] rise into peak k
  peak = np.argmax(climb, axis=1)                                      # [N]
  best = climb[np.arange(n), peak]
  found = ok & (best >= d)
  before_peak = np.arange(c)[None, :] < peak[:, None]
  valley = np.argmin(np.where(before_peak, valleys, np.inf), axis=1)
  rise = np.where(found, np.expm1(np.where(found, best, 0.0)), 0.0)
  return DoubleDescent(found=found, valley=np.where(found, valley, -1),
                       peak=np.where(found, peak, -1), rise=rise)


# --- group curves and tokens followed across sizes --------------------------------------------

def prepare_curves(losses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """What group_curves sums, computed once per size: (loss, perplexity, finite) as [C, N] float64
  with non-finite losses zeroed (their perplexity 0, their `finite` 0)."""
  loss = np.ascontiguousarray(np.asarray(losses, dtype=np.float64).T)     # [C, N]
  finite = np.isfinite(loss)
  loss = np.where(finite, loss, 0.0)
  with np.errstate(over="ignore"):
    ppl = np.where(finite, np.exp(loss), 0.0)
  return loss, ppl, finite.astype(np.float64)


def group_curves(losses, codes, num_groups: int, prepared=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Group curves of disjoint token sets at every checkpoint.

  losses: [N, C] nats; codes: [N] int, the set of each token (tokens outside [0, num_groups) are
  in none); prepared: prepare_curves(losses), to reuse across calls.
  Returns (group_ppl [num_groups, C] = exp(mean loss over the set's tokens with a finite loss
  there), NaN where none; arithmetic [num_groups, C] mean per-token perplexity over the same
  tokens; counts [num_groups] tokens per set). Sums are bincounts over (checkpoint, set): no
  matrix product, whose threads crawl on a busy machine.
  """
  loss, ppl, finite = prepare_curves(losses) if prepared is None else prepared
  c, n = loss.shape
  codes = np.asarray(codes)
  k = num_groups + 1                                                       # the last: no set
  group = np.where((codes >= 0) & (codes < num_groups), codes, num_groups).astype(np.int64)
  index = (group[None, :] + k * np.arange(c)[:, None]).ravel()            # [C * N]
  sums = lambda w: np.bincount(index, weights=w.ravel(), minlength=k * c).reshape(c, k)[:, :-1].T
  count = sums(finite)                                                     # [K, C]
  with np.errstate(invalid="ignore", divide="ignore"):
    curves = np.exp(sums(loss) / count)
    arithmetic = sums(ppl) / count
  empty = count == 0
  return (np.where(empty, np.nan, curves), np.where(empty, np.nan, arithmetic),
          np.bincount(group, minlength=k)[:-1].astype(np.int64))


def group_mean_perplexity(losses, codes) -> tuple[np.ndarray, np.ndarray]:
  """Group curve (exp(mean loss)) of each label's tokens at each checkpoint.

  losses: [N, C] nats; codes: [N] trend codes. Returns (curves [len(LABELS), C] float64, NaN for
  an empty group; counts [len(LABELS)] int).
  """
  group, _, counts = group_curves(losses, codes, len(trends.LABELS))
  return group, counts


def cross_size_curves(models: Sequence[ModelTrajectories], selections: Mapping[str, np.ndarray],
                      references: Sequence[str], selection_fraction: float) -> pd.DataFrame:
  """Tokens chosen by one size, followed in every size (module docstring).

  selections[R]: [N] trend codes of size R at the selection fraction. Curves are drawn for every
  (reference, model) with the reference in `references`, and for every size on its own tokens.
  Rows: reference_model, selection_fraction, selection_step, label, n_selected, percent_selected,
  model, step, tokens, flops, val_ppl, group_ppl.
  """
  by_name = {m.name: m for m in models}
  num_tokens = np.shape(models[0].losses)[0]
  labels = trends.TREND_LABELS
  frames = []
  for m in models:
    prepared = prepare_curves(m.losses)
    for ref in dict.fromkeys([*references, m.name]):
      group, _, counts = group_curves(m.losses, selections[ref], len(labels), prepared)
      ref_steps = np.asarray(by_name[ref].steps)
      selection_step = int(ref_steps[trends.start_index(ref_steps, selection_fraction)])
      for col, label in enumerate(labels):
        frames.append(pd.DataFrame({
            "reference_model": ref, "selection_fraction": selection_fraction,
            "selection_step": selection_step, "label": label, "n_selected": int(counts[col]),
            "percent_selected": 100.0 * counts[col] / num_tokens, "model": m.name,
            "step": np.asarray(m.steps), "tokens": m.column("tokens"), "flops": m.column("flops"),
            "val_ppl": m.column("val_ppl"), "group_ppl": group[col]}))
  frame = pd.concat(frames, ignore_index=True)
  order = {r: i for i, r in enumerate(dict.fromkeys(list(references) + [m.name for m in models]))}
  frame["_ref"] = frame["reference_model"].map(order)
  frame["_model"] = frame["model"].map({m.name: i for i, m in enumerate(models)})
  frame["_label"] = frame["label"].map({label: i for i, label in enumerate(labels)})
  frame = frame.sort_values(["_ref", "_label", "_model", "step"], kind="stable")
  return frame.drop(columns=["_ref", "_model", "_label"]).reset_index(drop=True)


def rise_then_fall(curve, min_change: float) -> tuple[bool, int, int, int, float, float]:
  """Whether a group curve rises and then falls (module docstring).

  curve: [n] perplexities (finite, > 0). Returns (found, valley, peak, end indices (-1 if n < 3),
  rise = curve[peak] / curve[valley], fall = curve[peak] / curve[end]).
  """
  g = np.log(np.asarray(curve, dtype=np.float64))
  n = g.shape[0]
  if n < 3:
    return False, -1, -1, -1, math.nan, math.nan
  before = np.minimum.accumulate(g)[:-2]                  # [n-2] min g[:k] for k = 1 .. n-2
  after = np.minimum.accumulate(g[::-1])[::-1][2:]        # [n-2] min g[k+1:]
  middle = g[1:-1]
  score = np.minimum(middle - before, middle - after)
  k = int(np.argmax(score)) + 1
  valley = int(np.argmin(g[:k]))
  end = k + 1 + int(np.argmin(g[k + 1:]))
  found = bool(score[k - 1] >= math.log1p(min_change))
  return found, valley, k, end, float(np.exp(g[k] - g[valley])), float(np.exp(g[k] - g[end]))


def group_double_descent(cross: pd.DataFrame, models: Sequence[ModelTrajectories],
                         references: Sequence[str], selection_fraction: float,
                         min_change: float) -> pd.DataFrame:
  """For the upward tokens of each reference, whether each other size's group curve rises then
  falls after the selection point (module docstring). Rows: reference_model, selection_fraction,
  n_upward, percent_upward, model, larger (more parameters than the reference), after (the
  window's rule), checkpoints, double_descent, valley_step, peak_step, end_step, rise, fall."""
  by_name = {m.name: m for m in models}
  rows = []
  for ref in references:
    r = by_name[ref]
    r_steps = np.asarray(r.steps)
    r_sel = trends.start_index(r_steps, selection_fraction)
    threshold = float(r.column("val_ppl")[r_sel])
    up = cross[(cross.reference_model == ref) & (cross.label == "upward")]
    for m in models:
      if m.name == ref:
        continue
      curve = up[up.model == m.name]
      steps, group = curve.step.to_numpy(), curve.group_ppl.to_numpy(float)
      val = curve.val_ppl.to_numpy(float)
      below = np.flatnonzero(np.isfinite(val) & (val <= threshold))
      if math.isfinite(threshold) and np.isfinite(val).any():
        first = int(below[0]) if below.size else len(steps)
        after = f"val_ppl <= {threshold:.4g}"
      else:
        first = trends.start_index(steps, selection_fraction)
        after = f"step >= {int(steps[first])}"
      window = np.arange(first, len(steps))
      window = window[np.isfinite(group[window]) & (group[window] > 0)]
      found, valley, peak, end, rise, fall = rise_then_fall(group[window], min_change)
      at = lambda i: int(steps[window[i]]) if i >= 0 else -1
      larger = (m.params is not None and r.params is not None and m.params > r.params)
      rows.append({"reference_model": ref, "selection_fraction": selection_fraction,
                   "n_upward": int(curve.n_selected.iloc[0]) if len(curve) else 0,
                   "percent_upward": float(curve.percent_selected.iloc[0]) if len(curve) else 0.0,
                   "model": m.name, "larger": bool(larger), "after": after,
                   "checkpoints": int(window.size), "double_descent": found,
                   "valley_step": at(valley), "peak_step": at(peak), "end_step": at(end),
                   "rise": rise, "fall": fall})
  return pd.DataFrame(rows, columns=[
      "reference_model", "selection_fraction", "n_upward", "percent_upward", "model", "larger",
      "after", "checkpoints", "double_descent", "valley_step", "peak_step", "end_step", "rise",
      "fall"])


# --- the whole analysis -----------------------------------------------------------------------

START_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)   # Figure 2's x axis


@dataclasses.dataclass
class Analysis:
  """Tables of the analysis. fits[(model, start_fraction)]: trends.TrendFit; selections[model]:
  [N] codes at the selection fraction; token_ids and positions [N]: each row's token (for
  `token_labels`); seconds: wall time of `analyze`."""

  percentages: pd.DataFrame
  agreement: pd.DataFrame
  double_descent: pd.DataFrame
  examples: pd.DataFrame
  group_means: pd.DataFrame
  cross_size: pd.DataFrame
  group_double_descent: pd.DataFrame
  fits: dict
  selections: dict
  double_descent_tokens: dict
  settings: dict
  token_ids: np.ndarray
  positions: np.ndarray
  seconds: float = math.nan

  def tables(self) -> dict[str, pd.DataFrame]:
    """{file stem: table} of the CSVs every run writes (the per-token tables are `token_labels`)."""
    return {"trend_percentages": self.percentages, "group_means": self.group_means,
            "cross_size": self.cross_size, "group_double_descent": self.group_double_descent,
            "agreement": self.agreement, "double_descent": self.double_descent,
            "double_descent_examples": self.examples}

  def token_labels(self, models: Sequence[ModelTrajectories], fraction: float) -> pd.DataFrame:
    """One row per (model, token): position, token id, the trend fit, the band statistics and the
    per-token double-descent flag."""
    num_tokens = self.token_ids.shape[0]
    return pd.concat([
        pd.DataFrame({"model": m.name, "token_index": np.arange(num_tokens),
                      "position": self.positions, "token_id": self.token_ids})
        .join(self.fits[(m.name, fraction)].to_frame())
        .assign(double_descent=self.double_descent_tokens[m.name].found
                & (self.fits[(m.name, fraction)].codes == trends.UPWARD))
        for m in models], ignore_index=True)


def check_settings(models: Sequence, start_fractions: Sequence[float],
                   selection_fraction: float, reference_models: Sequence[str]) -> list[str]:
  """Every problem of the analysis settings against the sizes' steps, one line each (empty: fine).

  models: anything with `name` and `steps` (ModelTrajectories or suite models), so a binary can
  check before scoring what `analyze` would refuse after it.
  """
  problems = []
  if not start_fractions:
    problems.append("no start fractions")
  names = [m.name for m in models]
  for ref in reference_models:
    if ref not in names:
      problems.append(f"reference model {ref!r} is not among the sizes {names}")
  for m in models:
    steps = np.asarray(m.steps, np.float64)
    checks = [(f, "start fraction") for f in start_fractions]
    if selection_fraction not in start_fractions:
      checks.append((selection_fraction, "selection fraction"))
    for f, what in checks:
      why = trends.window_problem(steps, f, what)
      if why:
        problems.append(f"model {m.name!r}: {why}")
  return problems


def analyze(models: Sequence[ModelTrajectories], token_ids=None, positions=None, *,
            start_fractions: Sequence[float] = START_FRACTIONS, alpha: float = 0.05,
            quantity: str = "perplexity", reference_models: Sequence[str] | None = None,
            selection_fraction: float = 0.1, group_min_change: float = 0.05, ema: float = 0.7,
            min_rise: float = 0.5, num_examples: int = 5,
            describe_token: Callable[[int], str] | None = None,
            progress: Callable[[str], None] | None = None) -> Analysis:
  """Runs every analysis on the models' loss matrices; returns the tables (nothing is written:
  `Analysis.tables`, `Analysis.token_labels`, `summary_markdown` and trajectory_plots give the
  files).

  token_ids, positions: [N] token id and position in the corpus of each row (for the tables).
  reference_models: sizes whose selected tokens are followed in every size (None: every size).
  selection_fraction: where the references select their tokens (fraction of their own run).
  group_min_change: the group-level double descent's minimum relative rise and fall.
  describe_token(row) -> the token in its context, for double-descent examples.
  progress(message): told what is being computed. Raises ValueError on mismatched inputs, an
  unknown reference or a fraction whose window cannot be fitted (check_settings).
  """
  started = time.perf_counter()
  check_models(models)
  references = [m.name for m in models] if reference_models is None else list(reference_models)
  problems = check_settings(models, start_fractions, selection_fraction, references)
  if problems:
    raise ValueError("; ".join(problems))
  if group_min_change <= 0:
    raise ValueError(f"group_min_change must be > 0, got {group_min_change}")
  num_tokens = np.shape(models[0].losses)[0]
  token_ids = np.full(num_tokens, -1) if token_ids is None else np.asarray(token_ids)
  positions = np.arange(num_tokens) if positions is None else np.asarray(positions)
  if token_ids.shape != (num_tokens,) or positions.shape != (num_tokens,):
    raise ValueError(f"token_ids {token_ids.shape} and positions {positions.shape} must have one "
                     f"entry per token ({num_tokens})")
  describe_token = describe_token or (
      lambda row: f"id {int(token_ids[row])} at {int(positions[row])}")
  say = progress or (lambda message: None)

  fits, dd, selections, mean_rows = {}, {}, {}, []
  for m in models:   # one size at a time: a float64 copy of one matrix is alive at once
    say(f"trends and double descent of {m.name}")
    values = quantity_of(m.losses, quantity)                               # [N, C] float64
    dd[m.name] = find_double_descent(values, ema=ema, min_rise=min_rise)
    for fraction in start_fractions:
      fits[(m.name, fraction)] = trends.classify_trends(values, m.steps, fraction, alpha)
    if (m.name, selection_fraction) not in fits:
      selected = trends.classify_trends(values, m.steps, selection_fraction, alpha)
    else:
      selected = fits[(m.name, selection_fraction)]
    selections[m.name] = selected.codes
    del values
    prepared = prepare_curves(m.losses)
    k = len(trends.LABELS) - 1                      # every label but invalid
    for fraction in start_fractions:
      group, arithmetic, counts = group_curves(m.losses, fits[(m.name, fraction)].codes, k,
                                               prepared)
      for c, label in enumerate(trends.LABELS[:k]):
        mean_rows.append(pd.DataFrame({
            "start_fraction": fraction, "model": m.name, "label": label, "n_tokens": int(counts[c]),
            "step": np.asarray(m.steps), "tokens": m.column("tokens"), "flops": m.column("flops"),
            "val_ppl": m.column("val_ppl"), "group_ppl": group[c],
            "arithmetic_mean_ppl": arithmetic[c]}))
    del prepared

  pct_rows, agree_rows, dd_rows, example_rows = [], [], [], []
  for fraction in start_fractions:
    say(f"tables, start fraction {fraction}")
    codes = {m.name: fits[(m.name, fraction)].codes for m in models}
    pct = trend_percentages({m.name: fits[(m.name, fraction)] for m in models})
    pct.insert(0, "start_fraction", fraction)
    pct_rows.append(pct)
    agree = pairwise_agreement(codes)
    agree.insert(0, "comparison", "matched_steps")
    agree.insert(0, "start_fraction", fraction)
    agree_rows.append(agree)
    for m in models:
      fit, found = fits[(m.name, fraction)], dd[m.name]
      upward = fit.codes == trends.UPWARD
      hits = upward & found.found
      dd_rows.append({"start_fraction": fraction, "model": m.name, "n_tokens": num_tokens,
                      "n_upward": int(upward.sum()), "n_double_descent": int(hits.sum()),
                      "fraction_of_upward": hits.sum() / upward.sum() if upward.any() else math.nan,
                      "percent_of_all": 100.0 * hits.sum() / num_tokens})
      for row in np.argsort(-np.where(hits, found.rise, -np.inf), kind="stable")[:min(num_examples,
                                                                                     hits.sum())]:
        example_rows.append({
            "start_fraction": fraction, "model": m.name, "token_index": int(row),
            "position": int(positions[row]), "token_id": int(token_ids[row]),
            "relative_rise": float(found.rise[row]),
            "valley_step": int(np.asarray(m.steps)[found.valley[row]]),
            "peak_step": int(np.asarray(m.steps)[found.peak[row]]),
            "context": describe_token(int(row))})

  say("tokens followed across sizes")
  cross = cross_size_curves(models, selections, references, selection_fraction)
  group_dd = group_double_descent(cross, models, references, selection_fraction, group_min_change)

  say("matched validation perplexity")
  matched = matched_perplexity_agreement(models, quantity=quantity, alpha=alpha)
  matched.insert(0, "comparison", "matched_ppl")
  matched.insert(0, "start_fraction", math.nan)

  return Analysis(
      percentages=pd.concat(pct_rows, ignore_index=True),
      agreement=pd.concat(agree_rows + [matched], ignore_index=True),
      double_descent=pd.DataFrame(dd_rows),
      examples=pd.DataFrame(example_rows, columns=[
          "start_fraction", "model", "token_index", "position", "token_id", "relative_rise",
          "valley_step", "peak_step", "context"]),
      group_means=pd.concat(mean_rows, ignore_index=True).sort_values(
          "start_fraction", kind="stable", ignore_index=True),
      cross_size=cross, group_double_descent=group_dd,
      fits=fits, selections=selections, double_descent_tokens=dd,
      settings={"alpha": alpha, "quantity": quantity, "ema": ema, "min_rise": min_rise,
                "start_fractions": list(start_fractions), "reference_models": references,
                "selection_fraction": selection_fraction, "group_min_change": group_min_change,
                "band": trends.BAND},
      token_ids=token_ids, positions=positions, seconds=time.perf_counter() - started)


def group_double_descent_line(result: Analysis) -> str:
  """One sentence: for each reference, the sizes whose curve on its upward tokens rises and then
  falls."""
  table = result.group_double_descent
  change = result.settings["group_min_change"]
  if not len(table):
    return "Group-level double descent: no other size to follow the reference's tokens in."
  parts = []
  for ref, rows in table.groupby("reference_model", sort=False):
    hits = rows[rows.double_descent]
    pct = float(rows.percent_upward.iloc[0])
    parts.append(f"{ref} ({pct:.1f}% upward) -> " + (", ".join(
        f"{r.model} (rises x{r.rise:.2f} from step {r.valley_step} to {r.peak_step}, falls "
        f"x{r.fall:.2f} by step {r.end_step})" for r in hits.itertuples())
        if len(hits) else "none"))
  return (f"Group-level double descent (upward tokens of a reference size at selection fraction "
          f"{result.settings['selection_fraction']:g}, followed in the other sizes: group curve "
          f"rises then falls by >= {100 * change:g}% after the selection point): "
          + "; ".join(parts) + ".")


def summary_markdown(result: Analysis, models: Sequence[ModelTrajectories],
                     notes: Sequence[str] = ()) -> str:
  """summary.md: the key numbers as markdown tables; notes: lines about the corpus and run."""
  alpha, quantity = result.settings["alpha"], result.settings["quantity"]
  ema, min_rise = result.settings["ema"], result.settings["min_rise"]
  band = result.settings["band"]
  num_tokens = np.shape(models[0].losses)[0]
  lines = [
      "# Token trajectories", "",
      f"{num_tokens} tokens; sizes: " + ", ".join(
          f"{m.name} ({len(m.steps)} checkpoints, steps {int(m.steps[0])}-{int(m.steps[-1])})"
          for m in models) + ".",
      f"Trend of per-token {quantity} (the paper's rule): OLS on log(step) after dividing by the "
      f"first kept value, two-sided t-test at alpha = {alpha}; stagnated: no significant slope, "
      f"geometric mean within +-{100 * band:g}% of the first and last kept values and variance "
      f"below it; unclassified: the other tokens with no significant slope (in no group). Group "
      f"curves: exp(mean loss). Per-token double-descent detector (an extra): EMA {ema}, minimum "
      f"relative rise {min_rise}.", *notes, "",
      "## Percentage of tokens per trend", ""]
  pct = result.percentages.pivot_table(index=["start_fraction", "model"], columns="label",
                                       values="percent", sort=False)
  pct = pct[[label for label in trends.LABELS if label in pct.columns]]
  lines += _markdown_table(pct.reset_index(), floatfmt="{:.1f}") + [""]
  lines += ["## Tokens chosen by one size, followed in every size", "",
            f"Each reference size labels its tokens after "
            f"{result.settings['selection_fraction']:g} of its training; cross_size.csv has every size's group curve on those tokens.", ""]
  sel = (result.cross_size.drop_duplicates(["reference_model", "label"])
         [["reference_model", "selection_step", "label", "n_selected", "percent_selected"]])
  lines += _markdown_table(sel, floatfmt="{:.1f}") + [""]
  lines += ["## Double descent", "", group_double_descent_line(result), ""]
  gdd = result.group_double_descent
  if len(gdd):
    lines += _markdown_table(gdd[["reference_model", "model", "after", "checkpoints",
                                  "double_descent", "valley_step", "peak_step", "end_step",
                                  "rise", "fall"]], floatfmt="{:.3f}") + [""]
  lines += ["### Per-token detector among upward tokens (an extra)", ""]
  lines += _markdown_table(result.double_descent[["start_fraction", "model", "n_upward",
                                                  "n_double_descent", "fraction_of_upward"]],
                           floatfmt="{:.3f}") + [""]
  if len(result.examples):
    lines += ["Examples (token in [[ ]]):", ""]
    for _, ex in result.examples.iterrows():
      lines.append(f"- {ex.model}, f={ex.start_fraction:g}: rise {ex.relative_rise:.2f} "
                   f"(steps {ex.valley_step} -> {ex.peak_step}): "
                   + str(ex.context).replace("\n", " "))
    lines.append("")
  lines += ["## Agreement between sizes (an extra)", "",
            "matched_steps: same start fraction of each run; matched_ppl: checkpoints whose "
            "validation perplexity lies in the overlap of both runs (see agreement.csv for windows).",
            ""]
  agree = result.agreement[["comparison", "start_fraction", "model_a", "model_b", "n_tokens",
                            "share_same", "kappa", "note"]].fillna({"note": ""})
  lines += _markdown_table(agree, floatfmt="{:.3f}") + [""]
  lines += [f"Analysis time: {result.seconds:.2f} s.", ""]
  return "\n".join(lines)


def _markdown_table(frame: pd.DataFrame, floatfmt: str) -> list[str]:
  def cell(value):
    if isinstance(value, float):
      return "" if math.isnan(value) else floatfmt.format(value)
    return str(value)
  header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
  rule = "|" + "---|" * len(frame.columns)
  rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
  return [header, rule] + rows
