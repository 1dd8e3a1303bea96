"""Trend classification against statsmodels OLS; agreement, matched perplexity, double descent."""

import itertools

import numpy as np
import pytest
import statsmodels.api as sm
from statsmodels.stats.inter_rater import cohens_kappa

from _trajectory_util import log_steps, planted_losses
from experiments.analysis import trajectories, trends


def _statsmodels_fit(values, steps, columns, alpha):
  """Independent oracle: one statsmodels OLS per token on the kept, normalised trajectory."""
  x = sm.add_constant(np.log(np.asarray(steps, np.float64)[columns]))
  out = []
  for row in values:
    y = row[columns] / row[columns[0]]
    res = sm.OLS(y, x).fit()
    label = ("stagnated" if res.pvalues[1] >= alpha else
             "upward" if res.params[1] > 0 else "downward")
    out.append((res.params[0], res.params[1], res.bse[1], res.pvalues[1], label))
  return [np.asarray(v) for v in zip(*out)]


@pytest.mark.parametrize("start_fraction", [0.1, 0.3, 0.7])
def test_matches_statsmodels_ols_params_and_pvalues(start_fraction):
  rng = np.random.default_rng(1)
  steps = np.sort(rng.choice(np.arange(1, 150_000), 25, replace=False))
  # Mixed trajectories: noise, plus a trend in log(step) for some tokens, so p spans (0, 1).
  trend = rng.normal(0, 0.05, (300, 1)) * np.log(steps)[None, :]
  values = np.exp(rng.normal(1.0, 0.3, (300, 25)) + trend)
  fit = trends.classify_trends(values, steps, start_fraction, alpha=0.05)
  first = trends.start_index(steps, start_fraction)
  assert fit.columns.tolist() == list(range(first, 25))
  intercept, slope, stderr, pvalue, labels = _statsmodels_fit(values, steps, fit.columns, 0.05)
  np.testing.assert_allclose(fit.intercept, intercept, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(fit.slope, slope, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(fit.stderr, stderr, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(fit.pvalue, pvalue, rtol=1e-8, atol=1e-12)
  assert fit.labels.tolist() == labels.tolist()
  assert len(set(labels)) == 3, "the data should exercise all three labels"


def test_start_checkpoint_is_nearest_step_to_fraction_of_last():
  steps = [100, 900, 1500, 2200, 5000, 10000]
  assert trends.start_index(steps, 0.1) == 1      # 1000: 900 is nearer than 1500
  assert trends.start_index(steps, 0.12) == 1     # 1200: tie 900/1500 -> the earlier
  assert trends.start_index(steps, 0.3) == 3      # 3000: 2200 is 800 away, 5000 is 2000
  assert trends.start_index(steps, 0.0) == 0
  assert trends.start_index(steps, 1.0) == 5


def test_fewer_than_three_kept_checkpoints_is_a_clear_error():
  steps = [10, 100, 1000, 10000]
  with pytest.raises(ValueError, match=r"start_fraction=0.7 keeps 1 checkpoint.*at least 3"):
    trends.classify_trends(np.ones((2, 4)), steps, start_fraction=0.7)
  with pytest.raises(ValueError, match="keeps 2 checkpoint"):
    trends.classify_trends(np.ones((2, 4)), steps, start_fraction=0.1)   # 1000 -> [1000, 10000]
  with pytest.raises(ValueError, match="strictly increasing"):
    trends.classify_trends(np.ones((2, 4)), [10, 100, 100, 1000], start_fraction=0.0)
  with pytest.raises(ValueError, match="one step per checkpoint"):
    trends.classify_trends(np.ones((2, 4)), [10, 100, 1000], start_fraction=0.0)


def test_constant_trajectory_is_stagnated_with_p_one_and_exact_line_is_significant():
  steps = np.array([10, 20, 40, 80, 160])
  exact_up = 1.0 + 0.5 * (np.log(steps) - np.log(steps[0]))   # y/y0 exactly linear in log(step)
  values = np.stack([np.full(5, 7.25), exact_up, 2.0 - 0.1 * np.log(steps)])
  fit = trends.classify_trends(values, steps, start_fraction=0.0)
  assert fit.labels.tolist() == ["stagnated", "upward", "downward"]
  assert fit.pvalue[0] == 1.0 and fit.slope[0] == 0.0
  assert fit.pvalue[1] < 1e-10 and fit.pvalue[2] < 1e-10
  np.testing.assert_allclose(fit.slope[1], 0.5, rtol=1e-12)


def test_non_finite_and_zero_start_are_invalid_and_counted():
  steps = [10, 100, 1000, 10000]
  values = np.array([[1.0, 2.0, 3.0, 4.0],
                     [1.0, np.nan, 3.0, 4.0],
                     [1.0, 2.0, np.inf, 4.0],
                     [0.0, 2.0, 3.0, 4.0],
                     [np.nan, 2.0, 3.0, 4.0]])
  fit = trends.classify_trends(values, steps, start_fraction=0.0)
  assert fit.labels.tolist()[1:4] == ["invalid"] * 3
  assert fit.labels[0] == "upward" and fit.labels[4] == "invalid"
  assert fit.num_invalid == 4 and fit.counts()["invalid"] == 4
  assert np.isnan(fit.pvalue[1:]).all()
  # A NaN before the kept window does not invalidate the fit over the window.
  late = trends.classify_trends(values[4:], steps, start_fraction=0.01)   # keeps steps 100..10000
  assert late.columns.tolist() == [1, 2, 3] and late.labels[0] == "upward"
  frame = fit.to_frame()
  assert list(frame.columns) == ["label", "slope", "intercept", "stderr", "pvalue"]


def test_blocked_evaluation_equals_one_block(monkeypatch):
  steps = log_steps(12)
  values = np.exp(np.random.default_rng(3).normal(size=(50, 12)))
  whole = trends.classify_trends(values, steps)
  monkeypatch.setattr(trends, "_BLOCK", 7)
  blocked = trends.classify_trends(values, steps)
  np.testing.assert_array_equal(whole.pvalue, blocked.pvalue)
  np.testing.assert_array_equal(whole.codes, blocked.codes)


def test_planted_trends_are_recovered():
  steps = log_steps(30)
  losses, kinds = planted_losses(steps)
  fit = trends.classify_trends(np.exp(losses.astype(np.float64)), steps, 0.1)
  labels = fit.labels
  assert (labels[kinds == "upward"] == "upward").all()
  assert (labels[kinds == "downward"] == "downward").all()
  assert (labels[kinds == "double_descent"] == "upward").all()
  # Pure noise: the test is at alpha = 0.05, so a few false trends are expected, not many.
  assert (labels[kinds == "stagnated"] == "stagnated").mean() >= 0.9


# --- agreement --------------------------------------------------------------------------------

def test_kappa_matches_statsmodels_and_hand_computed_value():
  # Hand-computed: table [[20, 5, 0], [10, 15, 0], [0, 0, 0]] -> p_o = 0.7, p_e = 0.5, kappa = 0.4.
  a = np.array([0] * 25 + [1] * 25, np.int8)
  b = np.array([0] * 20 + [1] * 5 + [0] * 10 + [1] * 15, np.int8)
  got = trajectories.label_agreement(a, b)
  assert got["n_tokens"] == 50 and got["share_same"] == pytest.approx(0.7)
  assert got["kappa"] == pytest.approx(0.4, abs=1e-12)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 4, 500).astype(np.int8)
  b = np.where(rng.random(500) < 0.6, a, rng.integers(0, 4, 500)).astype(np.int8)
  got = trajectories.label_agreement(a, b)
  valid = (a != trends.INVALID) & (b != trends.INVALID)
  table = np.zeros((3, 3))
  np.add.at(table, (a[valid], b[valid]), 1)
  assert got["n_tokens"] == valid.sum()
  assert got["kappa"] == pytest.approx(cohens_kappa(table).kappa, abs=1e-12)
  assert got["share_same"] == pytest.approx(np.trace(table) / valid.sum(), abs=1e-12)


def test_kappa_is_nan_when_chance_agreement_is_one():
  got = trajectories.label_agreement(np.zeros(10, np.int8), np.zeros(10, np.int8))
  assert got["share_same"] == 1.0 and np.isnan(got["kappa"])


def test_matched_perplexity_windows_follow_the_overlap_rule():
  ppl_a = [100.0, 50.0, 30.0, 20.0, 15.0, 12.0]
  ppl_b = [120.0, 40.0, 20.0, 10.0, 8.0, 6.0]
  mask_a, mask_b, lo, hi = trajectories.matched_perplexity_windows(ppl_a, ppl_b)
  assert (lo, hi) == (12.0, 100.0)
  assert mask_a.tolist() == [True] * 6
  assert mask_b.tolist() == [False, True, True, False, False, False]
  no_overlap = trajectories.matched_perplexity_windows([50.0, 40.0], [30.0, 20.0])
  assert not no_overlap[0].any() and not no_overlap[1].any()


def test_matched_perplexity_agreement_uses_the_windows():
  # Size "big" reaches low perplexity late in its run; inside the matched window its planted
  # trends equal the small model's, outside they are reversed. Matched steps disagree; matched
  # perplexity agrees.
  steps = log_steps(12, 10, 10000)
  small_ppl = np.geomspace(100, 20, 12)
  big_ppl = np.concatenate([np.geomspace(100, 20, 6), np.geomspace(15, 5, 6)])
  n = 60
  x = np.log(steps)
  sign = np.repeat([1.0, -1.0], n // 2)[:, None]
  small = 3.0 + sign * 0.1 * x[None, :]
  big = 3.0 + sign * 0.1 * np.where(np.arange(12) < 6, x, 2 * x[5] - x)[None, :]
  models = [trajectories.ModelTrajectories("small", steps, small, val_ppl=small_ppl),
            trajectories.ModelTrajectories("big", steps, big, val_ppl=big_ppl)]
  row = trajectories.matched_perplexity_agreement(models, quantity="loss").iloc[0]
  assert (row.checkpoints_a, row.checkpoints_b) == (12, 6)
  assert row.share_same == 1.0 and row.kappa == pytest.approx(1.0)
  fits = {m.name: trends.classify_trends(m.losses, steps, 0.3) for m in models}
  steps_row = trajectories.pairwise_agreement({k: f.codes for k, f in fits.items()}).iloc[0]
  assert steps_row.share_same == 0.0


def test_matched_perplexity_reports_why_a_pair_is_not_comparable():
  steps = log_steps(5, 10, 1000)
  losses = np.ones((4, 5))
  models = [trajectories.ModelTrajectories("a", steps, losses, val_ppl=[90, 80, 70, 60, 50.0]),
            trajectories.ModelTrajectories("b", steps, losses, val_ppl=[40, 30, 20, 10, 5.0]),
            trajectories.ModelTrajectories("c", steps, losses)]
  notes = trajectories.matched_perplexity_agreement(models).note.tolist()
  assert notes[0].startswith("no overlap") and notes[1] == notes[2] == "validation perplexity unknown"


# --- double descent ---------------------------------------------------------------------------

def _brute_force_double_descent(smoothed, d):
  """The definition itself: any i < j < k < l with a fall, a rise and a fall of at least d."""
  c = len(smoothed)
  for i, j, k, l in itertools.combinations(range(c), 4):
    s = smoothed
    if s[i] - s[j] >= d and s[k] - s[j] >= d and s[k] - s[l] >= d:
      return True
  return False


def test_double_descent_equals_brute_force_definition():
  rng = np.random.default_rng(5)
  values = np.exp(rng.normal(0, 0.2, (300, 9)))
  dd = trajectories.find_double_descent(values, ema=0.3, min_rise=0.2)
  smoothed = trajectories.ema_smooth(np.log(values), 0.3)
  expected = [_brute_force_double_descent(row, np.log1p(0.2)) for row in smoothed]
  assert dd.found.tolist() == expected
  assert 0.1 < np.mean(expected) < 0.9, "noise should give both outcomes"
  for row in np.flatnonzero(dd.found):
    j, k = dd.valley[row], dd.peak[row]
    assert j < k and smoothed[row, k] - smoothed[row, j] >= np.log1p(0.2)
    assert np.isclose(dd.rise[row], np.expm1(smoothed[row, k] - smoothed[row, j]))


def test_ema_smoothing_matches_recursion():
  v = np.array([[4.0, 0.0, 2.0, 8.0]])
  np.testing.assert_allclose(trajectories.ema_smooth(v, 0.5), [[4.0, 2.0, 2.0, 5.0]])
  np.testing.assert_array_equal(trajectories.ema_smooth(v, 0.0), v)


def test_planted_double_descent_tokens_are_found_and_nothing_else():
  steps = log_steps(30)
  losses, kinds = planted_losses(steps)
  dd = trajectories.find_double_descent(np.exp(losses.astype(np.float64)), ema=0.5, min_rise=0.1)
  assert dd.found.tolist() == (kinds == "double_descent").tolist()
  planted = kinds == "double_descent"
  # The valley is near u = 0.6 (step ~251) and the peak after it, near u = 0.9 (step ~3981, later
  # with the smoothing's lag).
  assert np.all((steps[dd.valley[planted]] > 150) & (steps[dd.valley[planted]] < 400))
  assert np.all((steps[dd.peak[planted]] > 3000) & (steps[dd.peak[planted]] < 8000))
  # Too large a minimum rise finds nothing.
  assert not trajectories.find_double_descent(np.exp(losses), ema=0.5, min_rise=10.0).found.any()


def test_default_double_descent_thresholds_reject_checkpoint_noise():
  # Upward trend plus iid noise of 0.2 nats per checkpoint, after a fast early fall: no double
  # descent is there, and the defaults must not invent one from the noise.
  rng = np.random.default_rng(0)
  u = np.linspace(0, 1, 40)
  losses = 2.0 + 0.5 * u[None, :] + 0.2 * rng.standard_normal((2000, 40))
  losses[:, :3] += [3.0, 1.5, 0.5]
  assert trajectories.find_double_descent(np.exp(losses)).found.mean() < 0.02
  # A real one: fall, a 3x rise, a 2.5x fall again, with the same noise.
  shape = np.interp(u, [0, 0.3, 0.6, 1.0], [5.0, 2.0, 3.1, 2.2])
  real = shape[None, :] + 0.2 * rng.standard_normal((200, 40))
  assert trajectories.find_double_descent(np.exp(real)).found.mean() > 0.95


def test_group_mean_perplexity_by_label():
  losses = np.log(np.array([[2.0, 4.0], [4.0, 8.0], [3.0, 3.0], [np.inf, 1.0]]))
  means, counts = trajectories.group_mean_perplexity(losses, np.array([1, 1, 0, 3]))
  np.testing.assert_allclose(means[trends.UPWARD], [3.0, 6.0])
  np.testing.assert_allclose(means[trends.STAGNATED], [3.0, 3.0])
  assert np.isnan(means[trends.DOWNWARD]).all() and counts.tolist() == [1, 2, 0, 1]


def test_mismatched_token_counts_name_the_sizes():
  steps = log_steps(5, 10, 1000)
  models = [trajectories.ModelTrajectories("125m", steps, np.ones((7, 5))),
            trajectories.ModelTrajectories("1.3b", steps, np.ones((6, 5)))]
  with pytest.raises(ValueError, match=r"mismatched token counts.*'125m': 7.*'1.3b': 6"):
    trajectories.check_models(models)
