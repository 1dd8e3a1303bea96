"""Trend labels against statsmodels OLS and the paper's rule written again
(tests/_trajectory_util.py); group curves, tokens followed across sizes, agreement, matched perplexity, double descent."""

import itertools

import numpy as np
import pytest
import statsmodels.api as sm
from statsmodels.stats.inter_rater import cohens_kappa

from _trajectory_util import (OPT_1_3B_STEPS, PAPER_LABELS, log_steps, paper_labels,
                              paper_start_index, planted_band_ppl, planted_losses)
from experiments.analysis import trajectories, trends


def _statsmodels_fit(values, steps, columns, alpha):
  """Independent oracle: one statsmodels OLS per token on the kept, normalised trajectory."""
  x = sm.add_constant(np.log(np.asarray(steps, np.float64)[columns]))
  out = []
  for row in values:
    y = row[columns] / row[columns[0]]
    res = sm.OLS(y, x).fit()
    out.append((res.params[0], res.params[1], res.bse[1], res.pvalues[1]))
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
  intercept, slope, stderr, pvalue = _statsmodels_fit(values, steps, fit.columns, 0.05)
  np.testing.assert_allclose(fit.intercept, intercept, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(fit.slope, slope, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(fit.stderr, stderr, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(fit.pvalue, pvalue, rtol=1e-8, atol=1e-12)
  significant = fit.pvalue < 0.05
  assert significant.any() and not significant.all(), "p should span both sides of alpha"
  np.testing.assert_array_equal(fit.labels[significant & (slope > 0)], "upward")
  np.testing.assert_array_equal(fit.labels[significant & (slope < 0)], "downward")
  assert set(fit.labels[~significant]) <= {"stagnated", "unclassified"}


@pytest.mark.parametrize("with_step_zero", [False, True])
def test_labels_equal_the_papers_rule_at_every_start_fraction(with_step_zero):
  # OPT-1.3B's checkpoint steps; a real suite (Pythia) also has step 0, which no fit keeps.
  steps = np.concatenate([[0], OPT_1_3B_STEPS]) if with_step_zero else OPT_1_3B_STEPS
  ppl, kinds = planted_band_ppl(steps, seed=int(with_step_zero))
  seen = set()
  for fraction in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
    fit = trends.classify_trends(ppl, steps, fraction)
    assert fit.columns[0] == paper_start_index(steps, fraction)
    expected, slope, pvalue = paper_labels(ppl, steps, fraction)
    assert fit.labels.tolist() == expected.tolist(), fraction
    np.testing.assert_allclose(fit.slope, slope, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fit.pvalue, pvalue, rtol=1e-8, atol=1e-12)
    seen |= set(expected)
    # The planted kinds land where they were planted (a few slopes of pure noise are significant
    # at alpha = 0.05 by chance).
    share = lambda kind, label: np.mean(fit.labels[kinds == kind] == label)
    assert share("flat_inside", "stagnated") >= 0.75
    assert share("flat_outside", "unclassified") >= 0.75
    assert share("noisy_level", "unclassified") >= 0.75
    assert share("wavy", "unclassified") >= 0.75
    assert share("up", "upward") == share("down", "downward") == share("nan", "invalid") == 1
  assert seen == set(PAPER_LABELS)
  counts = fit.counts()
  assert list(counts) == list(PAPER_LABELS) and sum(counts.values()) == len(kinds)


def test_band_statistics_are_the_rule_s_quantities():
  steps = log_steps(12, 10, 10000)
  ppl, _ = planted_band_ppl(steps, per_kind=3)
  ppl = ppl[:-3]                                     # the NaN kind is invalid: NaN statistics
  fit = trends.classify_trends(ppl, steps, 0.3)
  kept = ppl[:, fit.columns]
  gmean = np.exp(np.log(kept).mean(1))
  np.testing.assert_allclose(fit.gmean_over_start, gmean / kept[:, 0], rtol=1e-12)
  np.testing.assert_allclose(fit.gmean_over_end, gmean / kept[:, -1], rtol=1e-12)
  np.testing.assert_allclose(fit.variance_over_gmean, kept.var(1) / gmean, rtol=1e-10)
  assert list(fit.to_frame().columns)[-3:] == ["gmean_over_start", "gmean_over_end",
                                               "variance_over_gmean"]


def test_start_checkpoint_is_nearest_step_to_fraction_of_last():
  steps = [100, 900, 1500, 2200, 5000, 10000]
  assert trends.start_index(steps, 0.1) == 1      # 1000: 900 is nearer than 1500
  assert trends.start_index(steps, 0.12) == 1     # 1200: tie 900/1500 -> the earlier
  assert trends.start_index(steps, 0.3) == 3      # 3000: 2200 is 800 away, 5000 is 2000
  assert trends.start_index(steps, 0.0) == 0
  assert trends.start_index(steps, 1.0) == 5


def test_fewer_than_three_kept_checkpoints_is_a_clear_error():
  steps = [10, 100, 1000, 10000]
  with pytest.raises(ValueError, match=r"start fraction 0.7 keeps 1 checkpoint.*at least 3"):
    trends.classify_trends(np.ones((2, 4)), steps, start_fraction=0.7)
  with pytest.raises(ValueError, match="keeps 2 checkpoint"):
    trends.classify_trends(np.ones((2, 4)), steps, start_fraction=0.1)   # 1000 -> [1000, 10000]
  with pytest.raises(ValueError, match="strictly increasing"):
    trends.classify_trends(np.ones((2, 4)), [10, 100, 100, 1000], start_fraction=0.0)
  with pytest.raises(ValueError, match="one step per checkpoint"):
    trends.classify_trends(np.ones((2, 4)), [10, 100, 1000], start_fraction=0.0)
  # Step 0 may come before the kept window, never inside it (log(step)).
  with_zero = [0, 100, 1000, 5000, 10000]
  assert trends.classify_trends(np.ones((2, 5)), with_zero, 0.01).columns.tolist() == [1, 2, 3, 4]
  with pytest.raises(ValueError, match=r"start fraction 0 starts at step 0.*log\(step\)"):
    trends.classify_trends(np.ones((2, 5)), with_zero, 0.0)
  assert "starts at step 0" in trends.window_problem(with_zero, 0.001)
  assert trends.window_problem(with_zero, 0.1) is None


def test_constant_trajectory_is_stagnated_with_p_one_and_exact_line_is_significant():
  steps = np.array([10, 20, 40, 80, 160])
  exact_up = 1.0 + 0.5 * (np.log(steps) - np.log(steps[0]))   # y/y0 exactly linear in log(step)
  values = np.stack([np.full(5, 7.25), exact_up, 2.0 - 0.1 * np.log(steps)])
  fit = trends.classify_trends(values, steps, start_fraction=0.0)
  assert fit.labels.tolist() == ["stagnated", "upward", "downward"]   # a constant: in the band
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
  assert list(frame.columns)[:5] == ["label", "slope", "intercept", "stderr", "pvalue"]
  assert np.isnan(fit.gmean_over_start[1:]).all() and np.isfinite(fit.gmean_over_start[0])


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
  a = rng.integers(0, 5, 500).astype(np.int8)     # the four valid labels and invalid
  b = np.where(rng.random(500) < 0.6, a, rng.integers(0, 5, 500)).astype(np.int8)
  got = trajectories.label_agreement(a, b)
  valid = (a != trends.INVALID) & (b != trends.INVALID)
  table = np.zeros((4, 4))
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


def test_group_curves_are_exp_mean_loss():
  losses = np.log(np.array([[2.0, 4.0], [8.0, 16.0], [3.0, 3.0], [np.inf, 1.0]]))
  curves, counts = trajectories.group_mean_perplexity(losses, np.array([1, 1, 0, 4]))
  np.testing.assert_allclose(curves[trends.UPWARD], [4.0, 8.0])          # geometric: sqrt(2 x 8)
  np.testing.assert_allclose(curves[trends.STAGNATED], [3.0, 3.0])
  np.testing.assert_allclose(curves[trends.INVALID], [np.nan, 1.0])      # the inf is left out
  assert np.isnan(curves[trends.DOWNWARD]).all() and counts.tolist() == [1, 2, 0, 0, 1]


def _three_sizes(with_step_zero=False):
  """Three sizes on the same planted tokens; OPT-1.3B-like steps (step 0 in front on request)."""
  steps = np.concatenate([[0], OPT_1_3B_STEPS]) if with_step_zero else OPT_1_3B_STEPS
  models = []
  for i, name in enumerate(("s", "m", "l")):
    ppl, kinds = planted_band_ppl(steps, per_kind=8, seed=10 + i)
    ppl = np.where(np.isnan(ppl), 30.0, ppl)       # no invalid tokens: every label is followed
    val = np.geomspace(200, 20 / (i + 1), len(steps))
    models.append(trajectories.ModelTrajectories(name, steps, np.log(ppl).astype(np.float32),
                                                 flops=np.asarray(steps, float) * 10 ** i,
                                                 val_ppl=val, params=10 ** (i + 6)))
  return models, kinds


@pytest.mark.parametrize("with_step_zero", [False, True])
def test_group_and_cross_size_curves_equal_numpy_on_the_paper_rule_s_selection(with_step_zero):
  models, _ = _three_sizes(with_step_zero)
  result = trajectories.analyze(models, start_fractions=(0.1, 0.4), reference_models=["m"],
                                selection_fraction=0.2)
  n = models[0].losses.shape[0]
  group = result.group_means
  for m in models:   # each size's own groups at every start fraction
    for fraction in (0.1, 0.4):
      labels = paper_labels(np.exp(m.losses.astype(np.float64)), m.steps, fraction)[0]
      for label in ("stagnated", "upward", "downward", "unclassified"):
        rows = group[(group.model == m.name) & (group.start_fraction == fraction)
                     & (group.label == label)]
        chosen = labels == label
        assert rows.n_tokens.iloc[0] == chosen.sum()
        if chosen.any():
          np.testing.assert_allclose(rows.group_ppl, np.exp(m.losses[chosen].astype(np.float64)
                                                            .mean(0)), rtol=1e-10)
          np.testing.assert_allclose(rows.arithmetic_mean_ppl,
                                     np.exp(m.losses[chosen].astype(np.float64)).mean(0),
                                     rtol=1e-10)
  cross = result.cross_size
  ref = models[1]
  ref_labels = paper_labels(np.exp(ref.losses.astype(np.float64)), ref.steps, 0.2)[0]
  selection_step = ref.steps[paper_start_index(ref.steps, 0.2)]
  for label in ("stagnated", "upward", "downward"):
    chosen = ref_labels == label
    assert chosen.any()
    for m in models:   # every size on the reference's tokens
      rows = cross[(cross.reference_model == "m") & (cross.label == label)
                   & (cross.model == m.name)]
      np.testing.assert_array_equal(rows.step, m.steps)
      np.testing.assert_allclose(rows.group_ppl,
                                 np.exp(m.losses[chosen].astype(np.float64).mean(0)), rtol=1e-10)
      np.testing.assert_allclose(rows.val_ppl, m.val_ppl)
      assert (rows.n_selected == chosen.sum()).all()
      assert (rows.selection_step == selection_step).all()
      np.testing.assert_allclose(rows.percent_selected, 100 * chosen.mean())
  # Each size on its own tokens is there too (the left panels), for sizes that are no reference.
  own = cross[(cross.reference_model == "l") & (cross.model == "l") & (cross.label == "upward")]
  l_labels = paper_labels(np.exp(models[2].losses.astype(np.float64)), models[2].steps, 0.2)[0]
  np.testing.assert_allclose(own.group_ppl, np.exp(models[2].losses[l_labels == "upward"]
                                                   .astype(np.float64).mean(0)), rtol=1e-10)
  assert set(cross.reference_model) == {"m", "s", "l"}
  assert not len(cross[(cross.reference_model == "l") & (cross.model == "s")])
  assert "Tokens chosen by one size" in trajectories.summary_markdown(result, models)


def test_rise_then_fall_rule():
  found, valley, peak, end, rise, fall = trajectories.rise_then_fall(
      [10.0, 8.0, 9.0, 12.0, 11.0, 9.0, 9.5], 0.1)
  assert found and (valley, peak, end) == (1, 3, 5)
  assert rise == pytest.approx(1.5) and fall == pytest.approx(12 / 9)
  assert not trajectories.rise_then_fall([10.0, 9.0, 8.0, 7.0], 0.01)[0]        # falls only
  assert not trajectories.rise_then_fall([7.0, 8.0, 9.0, 10.0], 0.01)[0]        # rises only
  assert not trajectories.rise_then_fall([10.0, 10.2, 10.1], 0.05)[0]          # too small
  assert trajectories.rise_then_fall([10.0, 11.0], 0.01)[2] == -1               # too short


def test_group_double_descent_after_the_selection_point():
  # The reference's upward tokens rise in "big" after the selection point and then fall again;
  # in "other" they only fall.
  steps = log_steps(20, 10, 10000)
  u = np.log(steps) / np.log(steps[-1])
  n = 40
  up = 2.0 + 1.0 * u
  ref = np.concatenate([np.tile(up, (n, 1)), np.tile(np.full_like(u, 3.0), (n, 1))])
  bump = np.interp(u, [0, 0.5, 0.8, 1], [4.0, 2.0, 2.8, 2.2])
  big = np.concatenate([np.tile(bump, (n, 1)), np.tile(np.full_like(u, 3.0), (n, 1))])
  other = np.concatenate([np.tile(4.0 - 2 * u, (n, 1)), np.tile(np.full_like(u, 3.0), (n, 1))])
  val = np.geomspace(100, 10, 20)
  models = [trajectories.ModelTrajectories("ref", steps, ref, val_ppl=val, params=1),
            # big reaches the reference's perplexity at selection from its first checkpoint on
            trajectories.ModelTrajectories("big", steps, big, val_ppl=val / 10, params=2),
            trajectories.ModelTrajectories("other", steps, other, params=3)]
  result = trajectories.analyze(models, start_fractions=(0.1,), reference_models=["ref"],
                                quantity="loss", group_min_change=0.1)
  table = result.group_double_descent.set_index("model")
  assert table.loc["big", "double_descent"] and not table.loc["other", "double_descent"]
  assert table.loc["big", "after"].startswith("val_ppl <= ")
  assert table.loc["other", "after"].startswith("step >= ")        # no validation perplexity
  assert table.loc["big", "n_upward"] == n and table.loc["big", "larger"]
  peak = steps[np.argmax(np.where(u > 0.5, bump, -np.inf))]
  assert table.loc["big", "peak_step"] == peak
  valley = steps[np.argmin(np.where(u <= 0.8, bump, np.inf))]   # the bottom before the peak
  assert table.loc["big", "valley_step"] == valley and table.loc["big", "end_step"] == steps[-1]
  top, bottom = bump[steps == peak][0], bump[steps == valley][0]
  np.testing.assert_allclose(table.loc["big", "rise"], np.exp(top - bottom), rtol=1e-10)
  np.testing.assert_allclose(table.loc["big", "fall"], np.exp(top - bump[-1]), rtol=1e-10)
  line = trajectories.group_double_descent_line(result)
  assert "ref (50.0% upward) -> big (rises" in line


def test_mismatched_token_counts_name_the_sizes():
  steps = log_steps(5, 10, 1000)
  models = [trajectories.ModelTrajectories("125m", steps, np.ones((7, 5))),
            trajectories.ModelTrajectories("1.3b", steps, np.ones((6, 5)))]
  with pytest.raises(ValueError, match=r"mismatched token counts.*'125m': 7.*'1.3b': 6"):
    trajectories.check_models(models)
