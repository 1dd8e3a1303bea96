"""ICL metrics and analysis against independent math: scipy, statsmodels OLS, hand computation."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import statsmodels.api as sm

from experiments.analysis import icl


# --- per-task metrics ----------------------------------------------------------------------------

def test_task_metrics_by_hand():
  # Example 0: per token (the paper's) picks option 0 (correct): -6/3 = -2 > -4/1; summed picks 1.
  # Example 1: 3 options, correct option 2 wins every way.
  # Example 2: per token -3/4 > -4/1 and summed -3 > -4 pick option 0 (wrong); per character
  # -4/8 > -3/1 picks option 1 (correct).
  lp = [[-6.0, -4.0], [-9.0, -8.0, -1.0], [-3.0, -4.0]]
  ntok = [[3, 1], [2, 4, 1], [4, 1]]
  nch = [[12, 2], [5, 9, 3], [1, 8]]
  scores = [[1, 0], [0, 0, 1], [0, 1]]
  m = icl.task_metrics(lp, ntok, nch, scores)
  assert m["n"] == 3
  assert m["accuracy"] == pytest.approx(2 / 3)
  assert m["accuracy_summed"] == pytest.approx(1 / 3)
  assert m["accuracy_per_char"] == pytest.approx(1.0)
  # correct options: per-token NLL 6/3, 1/1, 4/1; incorrect: 4/1, mean(9/2, 8/4), 3/4
  assert m["correct_option_ppl"] == pytest.approx(np.exp((2 + 1 + 4) / 3))
  assert m["incorrect_option_ppl"] == pytest.approx(np.exp((4 + 3.25 + 0.75) / 3))
  assert (m["correct_option_tokens"], m["incorrect_option_tokens"]) == (3 + 1 + 1, 1 + 6 + 4)
  assert m["random_baseline"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_task_metrics_counts_any_top_scored_option_and_rejects_bad_shapes():
  m = icl.task_metrics([[-1.0, -2.0, -3.0]], [[1, 1, 1]], [[1, 1, 1]], [[0.5, 1, 0.5]])
  assert m["accuracy"] == m["accuracy_summed"] == 0.0  # a half-credit option: only the top counts
  m = icl.task_metrics([[-2.0, -1.0, -3.0]], [[1, 1, 1]], [[1, 1, 1]], [[0.5, 1, 0.5]])
  assert m["accuracy"] == 1.0
  with pytest.raises(ValueError, match="example 0"):
    icl.task_metrics([[-1.0, -2.0]], [[1]], [[1, 1]], [[1, 0]])
  with pytest.raises(ValueError, match="at least one token"):
    icl.task_metrics([[-1.0, -2.0]], [[0, 1]], [[1, 1]], [[1, 0]])


# --- correlations ---------------------------------------------------------------------------------

def _synthetic_results(seed=0):
  """3 sizes x 5 steps x 4 tasks; accuracy driven by perplexity plus noise."""
  rng = np.random.RandomState(seed)
  rows = []
  for mi, (model, params) in enumerate((("s", 1e6), ("m", 4e6), ("l", 1.6e7))):
    for si, step in enumerate((0, 100, 200, 400, 800)):
      tokens = step * 1000
      ppl = 300.0 / (1 + si) / (1 + mi) + 20
      for ti, task in enumerate(("t0", "t1", "t2", "t3")):
        rb = 1 / (2 + ti)
        acc = rb + 0.3 * (1 - np.log(ppl) / np.log(400)) + 0.02 * rng.randn()
        rows.append({"model": model, "step": step, "params": params, "tokens": tokens,
                     "flops": 6 * params * tokens, "validation_ppl": ppl, "task": task, "n": 50,
                     "accuracy": acc, "accuracy_summed": acc - 0.02,
                     "accuracy_per_char": acc - 0.01,
                     "correct_option_ppl": ppl * 0.8, "incorrect_option_ppl": ppl * 1.2,
                     "random_baseline": rb})
  return icl.check_results(pd.DataFrame(rows))


def test_correlations_match_scipy_and_statsmodels():
  means = icl.mean_accuracy(_synthetic_results())
  assert len(means) == 15 and (means["n_tasks"] == 4).all()
  corr = icl.correlations(means, "accuracy")
  assert list(corr.columns[:4]) == ["x", "spearman", "r2", "n"]
  assert list(corr["x"]) == ["validation_ppl", "flops", "params"]
  for _, row in corr.iterrows():
    d = means[means[row["x"]] > 0]            # flops are 0 at step 0: left out of that fit
    assert row["n"] == len(d)
    rho = scipy.stats.spearmanr(d[row["x"]], d["accuracy"]).statistic
    assert row["spearman"] == pytest.approx(rho, abs=1e-12)
    ols = sm.OLS(d["accuracy"].to_numpy(), sm.add_constant(np.log(d[row["x"]].to_numpy()))).fit()
    assert row["r2"] == pytest.approx(ols.rsquared, abs=1e-10)
    assert row["slope"] == pytest.approx(ols.params[1], abs=1e-10)
  assert corr.set_index("x").loc["flops", "n"] == 12
  assert corr.set_index("x").loc["validation_ppl", "spearman"] < -0.9


def test_above_random_is_a_constant_shift_with_the_same_statistics():
  means = icl.mean_accuracy(_synthetic_results())
  shift = means["accuracy"] - means["accuracy_above_random"]
  assert np.allclose(shift, np.mean([1 / 2, 1 / 3, 1 / 4, 1 / 5]))
  a = icl.correlations(means, "accuracy")
  b = icl.correlations(means, "accuracy_above_random")
  assert np.allclose(a[["spearman", "r2"]], b[["spearman", "r2"]])


def test_mean_accuracy_uses_only_tasks_every_checkpoint_has():
  df = _synthetic_results()
  df = df[~((df["task"] == "t3") & (df["model"] == "s") & (df["step"] == 100))]
  assert icl.common_tasks(df) == ["t0", "t1", "t2"]
  means = icl.mean_accuracy(df)
  assert (means["n_tasks"] == 3).all()
  row = means[(means["model"] == "l") & (means["step"] == 800)].iloc[0]
  sub = df[(df["model"] == "l") & (df["step"] == 800) & (df["task"] != "t3")]
  assert row["accuracy"] == pytest.approx(sub["accuracy"].mean())
  geo = np.exp(np.log(sub["correct_option_ppl"]).mean())
  assert row["correct_option_ppl"] == pytest.approx(geo)


def test_residuals_by_model_are_zero_when_x_explains_y_exactly():
  means = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3,
                        "validation_ppl": [100, 50, 25, 80, 40, 20],
                        "accuracy": 1 - 0.1 * np.log([100, 50, 25, 80, 40, 20])})
  r = icl.residuals_by_model(means)
  assert np.allclose(r["mean_residual"], 0, atol=1e-12)
  shifted = means.assign(accuracy=means["accuracy"] + np.where(means["model"] == "b", 0.05, 0))
  r = icl.residuals_by_model(shifted).set_index("model")
  assert r.loc["a", "mean_residual"] < 0 < r.loc["b", "mean_residual"]


def test_check_results_names_the_problem():
  df = _synthetic_results()
  with pytest.raises(ValueError, match=r"missing column\(s\) \['validation_ppl'\]"):
    icl.check_results(df.drop(columns=["validation_ppl"]), "x.csv")
  with pytest.raises(ValueError, match="repeat a"):
    icl.check_results(pd.concat([df, df.head(1)]), "x.csv")
  slim = icl.check_results(df[list(icl.REQUIRED_COLUMNS)], "x.csv")
  assert slim["random_baseline"].isna().all() and list(slim.columns) == list(icl.RESULT_COLUMNS)


# --- linearity and breakthroughness ---------------------------------------------------------------

def test_linearity_and_breakthroughness_by_hand():
  lin = [0.0, 0.1, 0.2, 0.3, 0.4]           # diffs 0.1 x4: I = 0.4, RMS = 0.1, median sq = 0.01
  assert icl.improvement(lin) == pytest.approx(0.4)
  assert icl.linearity(lin) == pytest.approx(4.0)
  assert icl.breakthroughness(lin) == pytest.approx(4.0)
  jump = [0.0, 0.0, 0.01, 0.0, 0.4]          # diffs 0, .01, -.01, .4
  i = 0.4
  assert icl.improvement(jump) == pytest.approx(i)
  assert icl.linearity(jump) == pytest.approx(i / np.sqrt((0 + 1e-4 + 1e-4 + 0.16) / 4))
  assert icl.breakthroughness(jump) == pytest.approx(i / np.sqrt(np.median([0, 1e-4, 1e-4, 0.16])))
  assert icl.breakthroughness(jump) > icl.breakthroughness(lin) > icl.linearity(jump)
  down = [0.4, 0.3, 0.1]                      # argmax before argmin: negative improvement
  assert icl.improvement(down) == pytest.approx(-0.3)
  assert icl.linearity(down) < 0
  assert icl.linearity([0.2, 0.2, 0.2]) == icl.breakthroughness([0.2, 0.2, 0.2]) == 0.0
  assert icl.breakthroughness([0, 0, 0, 1.0]) == np.inf


def test_task_scaling_orders_by_decreasing_perplexity_and_bins():
  df = pd.DataFrame({"task": "t", "validation_ppl": [10, 40, 20, 30, 50, 60],
                     "accuracy": [0.9, 0.3, 0.7, 0.5, 0.2, 0.1]})
  assert icl.ordered_scores(df).tolist() == [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
  assert np.allclose(icl.ordered_scores(df, n_bins=3), [0.15, 0.4, 0.8])
  df2 = df.assign(task="u", accuracy=[0.6, 0.1, 0.1, 0.1, 0.1, 0.1])  # jumps at ppl 10 (last)
  s = icl.task_scaling(pd.concat([df, df2]), n_bins=None).set_index("task")
  assert s.loc["t", "linearity"] == pytest.approx(icl.linearity([0.1, 0.2, 0.3, 0.5, 0.7, 0.9]))
  assert s.loc["u", "breakthroughness"] == np.inf
  assert icl.top_tasks(s.reset_index(), "linearity", 1) == ["t"]
  assert icl.top_tasks(s.reset_index(), "breakthroughness", 1) == ["u"]


# --- lm-evaluation-harness import ----------------------------------------------------------------

MODELS = [icl.ModelInfo("opt-125m", 125_000_000, 500_000, ("facebook/opt-125m",)),
          icl.ModelInfo("opt-1.3b", 1_300_000_000, 1_000_000, ("facebook/opt-1.3b",)),
          icl.ModelInfo("opt-13b", 13_000_000_000, 2_000_000, ("facebook/opt-13b",))]


def _write(path, results, model_args, n_samples=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = {"results": results, "config": {"model": "hf", "model_args": model_args}}
  if n_samples:
    data["n-samples"] = n_samples
  with open(path, "w") as f:
    json.dump(data, f)


def test_import_lm_eval_files(tmp_path):
  d = str(tmp_path)
  # harness >= 0.4 keys ("acc,none"), model by pretrained= and step by revision=
  _write(os.path.join(d, "facebook__opt-125m", "results_2024.json"),
         {"hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.31, "acc_stderr,none": 0.01},
          "piqa": {"acc,none": 0.6},
          "lambada_openai": {"perplexity,none": 40.0, "acc,none": 0.3}},
         "pretrained=facebook/opt-125m,revision=step2000,dtype=float16",
         {"hellaswag": {"original": 100, "effective": 100}})
  # harness 0.3 keys, a dict model_args with a local path; model and step from the file name
  _write(os.path.join(d, "opt-13b_step4000.json"),
         {"hellaswag": {"acc": 0.5, "acc_norm": 0.52}, "piqa": {"acc": 0.7},
          "lambada_openai": {"ppl": 9.0}},
         {"pretrained": "/ckpt/x", "dtype": "float16"})
  # opt-1.3b must not be mistaken for opt-13b; this one lacks piqa
  _write(os.path.join(d, "opt-1.3b_step1000.json"),
         {"hellaswag": {"acc": 0.4}, "lambada_openai": {"ppl": 20.0}}, "pretrained=/ckpt/y")
  _write(os.path.join(d, "unknown_step5.json"), {"hellaswag": {"acc": 0.1}}, "pretrained=gpt2")
  rows, problems = icl.import_lm_eval(d, MODELS, ["hellaswag", "piqa"])
  got = {(r.model, r.step, r.task): r for r in rows.itertuples()}
  assert sorted(got) == [("opt-1.3b", 1000, "hellaswag"), ("opt-125m", 2000, "hellaswag"),
                         ("opt-125m", 2000, "piqa"), ("opt-13b", 4000, "hellaswag"),
                         ("opt-13b", 4000, "piqa")]
  r = got[("opt-125m", 2000, "hellaswag")]
  assert (r.accuracy, r.accuracy_summed, r.accuracy_per_char, r.validation_ppl, r.n) == (
      0.3, 0.3, 0.31, 40.0, 100)
  assert r.tokens == 2000 * 500_000 and r.flops == 6.0 * 125_000_000 * 2000 * 500_000
  r = got[("opt-13b", 4000, "piqa")]
  assert (r.accuracy, r.validation_ppl, r.params) == (0.7, 9.0, 13_000_000_000)
  assert np.isnan(r.accuracy_per_char) and np.isnan(r.random_baseline)
  assert got[("opt-1.3b", 1000, "hellaswag")].params == 1_300_000_000
  assert any("opt-1.3b_step1000.json" in p and "'piqa'" in p for p in problems)
  assert any("unknown_step5.json" in p and "pretrained='gpt2'" in p for p in problems)


def test_import_lm_eval_refuses_two_files_for_one_checkpoint(tmp_path):
  for name in ("a", "b"):
    _write(os.path.join(str(tmp_path), f"{name}.json"), {"hellaswag": {"acc": 0.1}},
           "pretrained=facebook/opt-125m,revision=step10")
  with pytest.raises(ValueError, match="both opt-125m step 10"):
    icl.import_lm_eval(str(tmp_path), MODELS, ["hellaswag"])


def test_reruns_of_one_checkpoint_in_an_lm_eval_04_folder_give_the_newest(tmp_path):
  folder = os.path.join(str(tmp_path), "facebook__opt-125m")
  for date, acc in (("2024-05-01T10-00-00.1", 0.1), ("2024-06-01T10-00-00.2", 0.2)):
    _write(os.path.join(folder, f"results_{date}.json"),
           {"hellaswag": {"acc,none": acc}, "lambada_openai": {"perplexity,none": 30.0}},
           "pretrained=facebook/opt-125m,revision=step10")
  rows, problems = icl.import_lm_eval(str(tmp_path), MODELS, ["hellaswag"])
  assert list(rows.accuracy) == [0.2]
  assert problems == ["facebook__opt-125m/results_2024-05-01T10-00-00.1.json: an earlier run of "
                      "opt-125m step 10 than facebook__opt-125m/results_2024-06-01T10-00-00.2.json;"
                      " using the newer"]


def test_export_lm_eval_round_trips_through_import(tmp_path):
  import dataclasses  # pylint: disable=import-outside-toplevel

  @dataclasses.dataclass(frozen=True)
  class Model:                       # what a suite model gives the exporter and the importer
    name: str
    params: int
    tokens_per_step: int
    aliases: tuple = ()
    revisions: tuple = ()

    def revision(self, step):
      return dict(self.revisions).get(step)

  table = _synthetic_results()
  table.loc[table.task == "t1", "accuracy_per_char"] = np.nan  # a task without it
  models = [Model("s", 1_000_000, 1000, ("org/s",), ((100, "step100"),)),
            Model("m", 4_000_000, 1000), Model("l", 16_000_000, 1000, ("org/l",))]
  written = icl.export_lm_eval(table, str(tmp_path), models, k_shot=2)
  assert len(written) == 3 * 5
  with open(os.path.join(str(tmp_path), "org__s", "results_step100.json")) as f:
    data = json.load(f)
  assert data["config"]["model_args"] == "pretrained=org/s,revision=step100"
  assert data["results"]["t0"]["acc,none"] == float(
      table[(table.model == "s") & (table.step == 100)
            & (table.task == "t0")].accuracy_summed.iloc[0])
  assert data["results"]["t0"]["acc_per_token,none"] == pytest.approx(
      data["results"]["t0"]["acc,none"] + 0.02)
  assert "acc_norm,none" not in data["results"]["t1"] and data["n-shot"]["t0"] == 2
  back, problems = icl.import_lm_eval(str(tmp_path), models, ["t0", "t1", "t2", "t3"],
                                      metric="acc_per_token", ppl_task=icl.VALIDATION_TASK)
  assert problems == []
  cols = ["model", "step", "params", "tokens", "flops", "validation_ppl", "task", "n",
          "accuracy", "accuracy_summed", "accuracy_per_char"]
  key = ["model", "step", "task"]
  want = table[cols].sort_values(key).reset_index(drop=True)
  got = back[cols].sort_values(key).reset_index(drop=True)
  pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_verdict_calls_a_predictor_best_only_when_the_bootstrap_separates_it():
  # 15 noisy checkpoints: perplexity's R^2 is higher than FLOPs', but the interval of the
  # difference includes 0, so nothing is called best.
  a = icl.analyze(_synthetic_results(), n_bins=None)
  text = " ".join(icl.verdict(a))
  assert "no predictor is called best" in text and "best predictor" not in text
  comp = a.comparisons[a.comparisons["y"] == "accuracy"].set_index("x")
  assert comp.loc["flops", "r2_diff_lo"] < 0 < comp.loc["flops", "r2_diff_hi"]
  assert "similar accuracy (independent of size" in text and "overlap for s/m, s/l, m/l" in text
  # Every correlation printed with its interval and n.
  c = a.correlations.set_index("x")
  v = c.loc["validation_ppl"]
  assert v["spearman_lo"] <= v["spearman"] <= v["spearman_hi"] and v["r2_lo"] <= v["r2"]
  assert f"rho {v['spearman']:.3f} [{v['spearman_lo']:.3f}, {v['spearman_hi']:.3f}]" in text
  assert "(n = 15)" in text and "(n = 12)" in text
  # Accuracy a function of perplexity alone, FLOPs unrelated (perplexity shuffled against
  # steps): every interval of R^2(ppl) - R^2(x) lies above 0.
  df = _synthetic_results(seed=1)
  rng = np.random.RandomState(3)
  ckpt = df.groupby(["model", "step"])["validation_ppl"].first()
  shuffled = dict(zip(ckpt.index, rng.permutation(ckpt.to_numpy())))
  df["validation_ppl"] = [shuffled[(m, s)] for m, s in zip(df["model"], df["step"])]
  df["accuracy"] = df["random_baseline"] + 0.3 * (1 - np.log(df["validation_ppl"]) / np.log(400))
  text = " ".join(icl.verdict(icl.analyze(df, n_bins=None)))
  assert "validation perplexity is the best predictor of these, as the paper claims" in text
  # Accuracy driven by FLOPs and not by perplexity: FLOPs wins, at chance.
  df = _synthetic_results()
  df["accuracy"] = df["random_baseline"] + 0.01 * np.log1p(df["flops"]) / 30
  df["validation_ppl"] = np.random.RandomState(1).permutation(df["validation_ppl"].to_numpy())
  text = " ".join(icl.verdict(icl.analyze(df, n_bins=None)))
  assert "FLOPs and parameters predict accuracy better than validation perplexity" in text
  assert "at chance" in text and "say nothing about size" in text
  md = icl.summary_markdown(a, notes=["note A"], failures={"bad_task": "example 3: broken"})
  assert "- note A" in md and "bad_task: example 3: broken" in md
  assert "| accuracy | validation_ppl |" in md and "95% interval" in md


def test_sizes_whose_perplexity_ranges_do_not_meet_are_said_to_have_no_overlap():
  df = _synthetic_results()
  df.loc[df["model"] == "l", "validation_ppl"] /= 10      # l: 4-12, s: 80-320, m: 50-170
  a = icl.analyze(df, n_bins=None)
  r = a.ranges.set_index("model")
  assert (r.loc["l", "ppl_min"], r.loc["l", "ppl_max"]) == pytest.approx((4.0, 12.0))
  assert icl.overlapping_pairs(a.ranges) == [("s", "m")]
  assert "no overlap for s/l, m/l" in " ".join(icl.verdict(a))
  df.loc[df["model"] == "m", "validation_ppl"] /= 3       # m: 16.7-56.7: no pair meets
  text = " ".join(icl.verdict(icl.analyze(df, n_bins=None)))
  assert "No overlap: the sizes' validation perplexity ranges do not meet" in text
  assert "similar accuracy" not in text and "differ noticeably" not in text


def test_bootstrap_statistics_match_scipy_on_each_replicate():
  rng = np.random.RandomState(0)
  x = rng.uniform(1, 100, size=(6, 9))
  y = rng.randn(6, 9)
  y[2] = 0.5                                           # a constant row: undefined
  rho, r2 = icl._replicate_stats(x, y)
  for i in range(6):
    if i == 2:
      assert np.isnan(rho[i]) and np.isnan(r2[i])
      continue
    assert rho[i] == pytest.approx(scipy.stats.spearmanr(x[i], y[i]).statistic, abs=1e-12)
    ols = sm.OLS(y[i], sm.add_constant(np.log(x[i]))).fit()
    assert r2[i] == pytest.approx(ols.rsquared, abs=1e-12)


def test_group_curves_weight_option_ppl_by_tokens_and_smooth_as_the_authors_do():
  df = _synthetic_results()
  df["correct_option_tokens"] = df["task"].map({"t0": 10, "t1": 30, "t2": 5, "t3": 1})
  df["incorrect_option_tokens"] = 2 * df["correct_option_tokens"]
  df.loc[df["task"] == "t1", "correct_option_ppl"] *= 3
  table, used = icl.group_curves(df, {"g": ["t0", "t1", "absent"]})
  assert used == {"g": ["t0", "t1"]}
  s = table[table["model"] == "s"].sort_values("step")
  sub = df[(df["model"] == "s") & (df["task"].isin(["t0", "t1"]))].sort_values(["step", "task"])
  want = []
  for step, d in sub.groupby("step"):
    w = d["correct_option_tokens"].to_numpy(float)
    want.append(np.exp((np.log(d["correct_option_ppl"]) * w).sum() / w.sum()))
  assert s["correct_option_ppl"].to_numpy() == pytest.approx(want)
  acc = sub.groupby("step")["accuracy"].mean().to_numpy()
  assert s["accuracy"].to_numpy() == pytest.approx(acc)
  smooth = [acc[0]]                                    # utils.exponential_moving_average, w=0.5
  for v in acc[1:]:
    smooth.append(smooth[-1] * 0.5 + v * 0.5)
  assert s["accuracy_ema"].to_numpy() == pytest.approx(smooth)
  assert icl.ema([1.0, 3.0, 3.0], 0.8) == pytest.approx([1.0, 1.4, 1.72])
  # A checkpoint lacking one of the group's tasks is left out of the group.
  gap = df[~((df["model"] == "m") & (df["step"] == 200) & (df["task"] == "t1"))]
  table, _ = icl.group_curves(gap, {"g": ["t0", "t1"]})
  assert len(table) == 14 and not ((table["model"] == "m") & (table["step"] == 200)).any()


def test_final_option_ppl_takes_each_sizes_last_checkpoint():
  a = icl.analyze(_synthetic_results(), n_bins=None)
  f = a.final_options
  assert list(f["model"]) == ["s", "m", "l"] and (f["step"] == 800).all()
  row = a.means[(a.means["model"] == "m") & (a.means["step"] == 800)].iloc[0]
  assert f.set_index("model").loc["m", "incorrect_option_ppl"] == row["incorrect_option_ppl"]


def test_lm_eval_files_carry_the_keys_its_readers_use_and_its_stderr(tmp_path):
  """make_table is lm-eval's own table printer (skipped where lm_eval is not installed)."""
  table = _synthetic_results()
  table["n"] = 7
  models = [icl.ModelInfo(m, p, 1000, (f"org/{m}",)) for m, p in (("s", 1), ("m", 4), ("l", 16))]
  icl.export_lm_eval(table, str(tmp_path), models, k_shot=2)
  with open(os.path.join(str(tmp_path), "org__m", "results_step400.json")) as f:
    data = json.load(f)
  row = table[(table.model == "m") & (table.step == 400) & (table.task == "t2")].iloc[0]
  entry = data["results"]["t2"]
  # lm-eval's mean_stderr: sample standard deviation (n - 1) over sqrt(n), on 0/1 items.
  items = np.array([1.0] * 3 + [0.0] * 4)
  assert icl.accuracy_stderr(3 / 7, 7) == pytest.approx(items.std(ddof=1) / np.sqrt(7))
  assert entry["acc_per_token_stderr,none"] == pytest.approx(
      icl.accuracy_stderr(row["accuracy"], 7))
  assert data["versions"]["t2"] == 1.0 and data["n-shot"]["t2"] == 2
  assert data["higher_is_better"]["t2"] == {"acc_per_token": True, "acc": True, "acc_norm": True}
  assert data["higher_is_better"]["validation_ppl"] == {"perplexity": False}
  assert data["n-samples"]["t2"] == {"original": 7, "effective": 7}
  assert data["configs"]["t2"]["num_fewshot"] == 2
  lm_eval_utils = pytest.importorskip(
      "lm_eval.utils", reason="lm_eval is not installed: lm-eval's make_table is not run")
  printed = lm_eval_utils.make_table(data)
  assert "acc_per_token" in printed and "±" in printed and "↑" in printed
