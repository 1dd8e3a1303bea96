"""End to end: downstream_icl on a tiny suite (2 sizes x 3 random checkpoints, tiny BPE), the
paper's defaults (its task list, 2-shot, per-token normalised prediction) on a few shared BIG-bench
tasks and cloze tasks; predictions checked against HF PyTorch."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from _suite_util import ICL_SIZES, hf_opt_model, make_suite
from experiments import downstream_icl
from experiments.analysis import icl
from experiments.tasks import bigbench as bb
from experiments.tasks import icl as icl_tasks
from opt_jax.checkpoints import checkpoint
from opt_jax.errors import InputError
from opt_jax.tokenizer import load_tokenizer

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bigbench")
# Two of the paper's tasks in no group, one linearity and one breakthroughness task.
TASKS = ("anachronisms", "emoji_movie", "misconceptions", "phrase_relatedness")
SIZES = ICL_SIZES
STEPS = (10, 20, 30)
TEXT = "\n".join(
    f"The {a} of the {b} went {c} to the {d} and said the {e} was {f}."
    for a, b, c, d, e, f in zip(
        ["king", "queen", "fool", "ghost", "prince", "lord", "lady", "knight"] * 4,
        ["castle", "garden", "forest", "river", "tower", "field", "hall", "gate"] * 4,
        ["slowly", "quickly", "home", "away", "out", "back", "down", "up"] * 4,
        ["sea", "hill", "town", "church", "court", "bridge", "inn", "road"][::-1] * 4,
        ["night", "day", "storm", "wind", "song", "feast", "war", "peace"] * 4,
        ["cold", "dark", "long", "fair", "strange", "near", "over", "sweet"][::-1] * 4))


def _write_task(directory, examples):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "task.json"), "w") as f:
    json.dump({"examples": examples}, f)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  if not os.path.isdir(SHARED):
    pytest.skip("../shared/data/bigbench absent")
  root = str(tmp_path_factory.mktemp("icl"))
  suite = make_suite(os.path.join(root, "suite"), SIZES, steps=STEPS)
  # A BIG-bench folder: links to four shared tasks plus a malformed one (not in the paper's list).
  bench = os.path.join(root, "bigbench")
  for t in TASKS:
    os.makedirs(bench, exist_ok=True)
    os.symlink(os.path.abspath(os.path.join(SHARED, t)), os.path.join(bench, t))
  _write_task(os.path.join(bench, "broken"),
              [{"input": "q", "target_scores": {"a": 1, "b": 0}},
               {"input": "q", "target_scores": "a"}])
  text = os.path.join(root, "held_out.txt")
  with open(text, "w") as f:
    f.write(TEXT)
  out = os.path.join(root, "out")
  # The paper's defaults: no --tasks, no --k_shot. Plots are drawn once below (analyze_and_report,
  # what run calls) to keep the test short.
  settings = downstream_icl.Settings(
      suite=suite, out=out, bigbench_dir=bench, cloze_text=(text,), cloze_examples=4,
      max_examples=3, validation_text=(text,), batch_size=4, n_bins=2, top_k=2, plots=False)
  outcome = downstream_icl.run(settings, progress=False)
  table = outcome.table
  downstream_icl.analyze_and_report(table, os.path.join(root, "plotted"), n_bins=2, top_k=2,
                                    plots=True)
  return {"root": root, "suite": suite, "out": out, "table": table, "settings": settings,
          "summary": outcome.summary, "bench": bench}


def test_default_run_is_two_shot_on_the_papers_tasks_with_every_checkpoint(env):
  df = pd.read_csv(os.path.join(env["out"], "icl_results.csv"))
  assert list(df.columns) == list(icl.RESULT_COLUMNS) + ["k_shot"]
  tasks = sorted(TASKS + ("cloze_next_line", "cloze_next_word"))
  assert sorted(df["task"].unique()) == tasks          # "broken" is not in the paper's list
  assert len(df) == 2 * 3 * len(tasks) and set(df["k_shot"]) == {2}
  assert (df["n"][df["task"].isin(TASKS)] == 3).all()
  rb = df.groupby("task")["random_baseline"].first()
  assert rb["anachronisms"] == 0.5 and rb["emoji_movie"] == pytest.approx(0.2)
  assert rb["cloze_next_word"] == 0.25
  first = df[(df["model"] == "tiny-b") & (df["step"] == 30)].iloc[0]
  assert first["params"] == SIZES["tiny-b"].num_params()
  assert first["tokens"] == 30 * 1000 and first["flops"] == 6.0 * first["params"] * 30 * 1000
  ppl = df.groupby(["model", "step"])["validation_ppl"].first()
  assert (ppl > 1).all() and ppl.nunique() == 6  # every checkpoint its own perplexity
  for c in ("accuracy", "accuracy_summed", "accuracy_per_char"):
    assert ((df[c] >= 0) & (df[c] <= 1)).all()
  # The headline is the mean of the per-token normalised accuracy.
  means = pd.read_csv(os.path.join(env["out"], "mean_accuracy.csv"))
  by_ckpt = df.groupby(["model", "step"])["accuracy"].mean().to_numpy()
  assert means.sort_values(["model", "step"])["accuracy"].to_numpy() == pytest.approx(by_ckpt)
  corr = pd.read_csv(os.path.join(env["out"], "correlations.csv")).set_index("x")
  text = env["summary"].render(3.0)
  assert "mean 2-shot accuracy over 6 tasks vs log validation perplexity" in text
  assert f"rho {corr.loc['validation_ppl', 'spearman']:.3f} [" in text


def test_predictions_under_the_papers_normalisation_match_hf_pytorch(env):
  """tiny-a step 20, two tasks, 2-shot: each option's log-prob from HF OPTForCausalLM (the
  window's last max_positions tokens, as the harness truncates), the mean per token, argmax."""
  path = os.path.join(env["root"], "suite", "ckpt", "tiny-a", "step20")
  model, config = hf_opt_model(path), checkpoint.load_config(path)
  tok = load_tokenizer(path)
  length = config.max_position_embeddings
  df = pd.read_csv(os.path.join(env["out"], "icl_results.csv"))
  for name in ("anachronisms", "phrase_relatedness"):
    task = bb.load_task(os.path.join(SHARED, name))
    hits, hits_sum, nll_correct = [], [], []
    for r in bb.requests_for(task, k=2, seed=0, max_examples=3):
      ctx_ids = tok.encode(r.context)
      lp, nt = [], []
      for cont in r.continuations:
        whole = tok.encode(r.context + cont)
        n_cont = len(whole) - len(ctx_ids)
        window = whole[-(length + 1):]
        with torch.no_grad():
          logits = model(torch.tensor([window[:-1]])).logits[0].double()
        per_token = torch.log_softmax(logits, -1)[torch.arange(len(window) - 1),
                                                  torch.tensor(window[1:])].numpy()
        lp.append(per_token[-n_cont:].sum())
        nt.append(n_cont)
      lp, nt = np.array(lp), np.array(nt)
      top = np.array(r.example.scores) == max(r.example.scores)
      hits.append(top[np.argmax(lp / nt)])
      hits_sum.append(top[np.argmax(lp)])
      c = int(np.argmax(r.example.scores))
      nll_correct.append(-lp[c] / nt[c])
    row = df[(df["model"] == "tiny-a") & (df["step"] == 20) & (df["task"] == name)].iloc[0]
    assert row["accuracy"] == pytest.approx(np.mean(hits), abs=1e-9), name
    assert row["accuracy_summed"] == pytest.approx(np.mean(hits_sum), abs=1e-9), name
    assert row["correct_option_ppl"] == pytest.approx(np.exp(np.mean(nll_correct)), rel=1e-4)


def test_analysis_outputs_groups_and_four_axis_plot(env):
  out = env["out"]
  corr = pd.read_csv(os.path.join(out, "correlations.csv"))
  assert list(corr.columns[:4]) == ["x", "spearman", "r2", "n"]
  assert list(corr["x"]) == ["validation_ppl", "flops", "params"]
  assert corr.set_index("x").loc["validation_ppl", "n"] == 6
  assert {"spearman_lo", "spearman_hi", "r2_lo", "r2_hi"} <= set(corr.columns)
  groups = pd.read_csv(os.path.join(out, "task_groups.csv"))
  assert set(groups["group"]) == {"linearity", "breakthroughness"}
  assert len(groups) == 2 * 6 and set(groups["model"]) == {"tiny-a", "tiny-b"}
  lin = groups[groups["group"] == "linearity"].sort_values(["model", "step"])
  want = env["table"][env["table"]["task"] == "misconceptions"].sort_values(["model", "step"])
  assert lin["accuracy"].to_numpy() == pytest.approx(want["accuracy"].to_numpy())
  final = pd.read_csv(os.path.join(out, "final_option_ppl.csv"))
  assert list(final["model"]) == ["tiny-a", "tiny-b"] and (final["step"] == 30).all()
  plots = os.path.join(env["root"], "plotted", "plots")
  for stem in ("mean_accuracy", "option_ppl", "final_option_ppl", "group_linearity",
               "group_breakthroughness", "tasks_linearity", "tasks_breakthroughness",
               "task_trajectories"):
    for ext in ("png", "pdf"):
      assert os.path.getsize(os.path.join(plots, f"{stem}.{ext}")) > 0, stem
  assert not os.path.exists(os.path.join(out, "plots"))  # plots=False draws nothing
  summary = open(os.path.join(out, "summary.md")).read()
  assert "Spearman rho" in summary and "2-shot prompts" in summary
  assert "linearity (1 tasks: misconceptions)" in summary
  # The paper's tasks missing from the folder: listed once in summary.md and the closing summary.
  missing = [t for t in bb.PAPER_TASKS if t not in TASKS]
  assert summary.count("sports_understanding") == 1 and ", ".join(missing) in summary
  text = env["summary"].render(3.0)
  assert f"{len(missing)} of the paper's 74 tasks not in --bigbench_dir" in text
  means = pd.read_csv(os.path.join(out, "mean_accuracy.csv"))
  assert len(means) == 6 and (means["n_tasks"] == 6).all()


def test_four_axis_plot_has_the_papers_panels(env, monkeypatch, tmp_path):
  from experiments.analysis import icl_plots  # pylint: disable=import-outside-toplevel
  a = icl.analyze(env["table"], groups=bb.TASK_GROUPS, n_bins=2, replicates=50)
  drawn = {}

  def record(fig, stem):
    drawn[os.path.basename(stem)] = [ax.get_xlabel() for ax in fig.axes]
    icl_plots.plt.close(fig)
    return []
  monkeypatch.setattr(icl_plots, "save", record)
  icl_plots.plot_all(a, str(tmp_path))
  assert drawn["mean_accuracy"] == ["validation perplexity (decreasing ->)", "training FLOPs",
                                    "training tokens", "training steps"]


def test_second_run_scores_nothing(env):
  store = os.path.join(env["out"], "store")
  files = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
           for d, _, fs in os.walk(store) for f in fs}
  assert len(files) == 6
  table = downstream_icl.run(env["settings"], progress=False).table
  after = {p: os.path.getmtime(p) for p in files}
  assert after == files
  pd.testing.assert_frame_equal(table, env["table"])


def test_missing_bigbench_folder_says_how_to_fetch(env):
  with pytest.raises(FileNotFoundError, match="fetch_bigbench .*--from=PATH"):
    downstream_icl.run(downstream_icl.Settings(suite=env["suite"],
                                               out=os.path.join(env["root"], "x"),
                                               bigbench_dir=os.path.join(env["root"], "nowhere")),
                       progress=False)


def test_results_are_written_as_lm_eval_files_that_import_back(env):
  from opt_jax import suite as suite_lib  # pylint: disable=import-outside-toplevel
  models = suite_lib.load_suite(env["suite"]).models
  tasks = sorted(env["table"]["task"].unique())
  cols = ["model", "step", "params", "tokens", "flops", "validation_ppl", "task", "n",
          "accuracy", "accuracy_summed", "accuracy_per_char"]
  back, problems = icl.import_lm_eval(os.path.join(env["out"], downstream_icl.LM_EVAL_DIR),
                                      models, tasks, metric="acc_per_token",
                                      ppl_task=icl.VALIDATION_TASK)
  assert problems == []
  key = ["model", "step", "task"]
  pd.testing.assert_frame_equal(back[cols].sort_values(key).reset_index(drop=True),
                                env["table"][cols].sort_values(key).reset_index(drop=True),
                                check_dtype=False)


def test_lm_eval_import_with_a_manifest_without_checkpoints(tmp_path):
  manifest = tmp_path / "suite.json"
  manifest.write_text(json.dumps({"name": "opt", "models": [
      {"name": "opt-125m", "params": 125_000_000, "tokens_per_step": 500_000,
       "aliases": ["facebook/opt-125m"], "checkpoints": {"1000": "nowhere/a", "2000": "nowhere/b",
                                                         "4000": "nowhere/c"}},
      # Nothing is read from checkpoints here: a model may list none.
      {"name": "opt-350m", "params": 350_000_000, "tokens_per_step": 500_000,
       "aliases": ["facebook/opt-350m"]}]}))
  results = tmp_path / "lm_eval"
  results.mkdir()
  for i, (model, step) in enumerate([(m, s) for m in ("opt-125m", "opt-350m")
                                     for s in (1000, 2000, 4000)]):
    ppl = 60.0 / (1 + i % 3) / (1.5 if model == "opt-350m" else 1)
    data = {"results": {"lambada_openai": {"perplexity,none": ppl},
                        "hellaswag": {"acc,none": 0.5 - 0.05 * np.log(ppl)},
                        "piqa": {"acc,none": 0.8 - 0.04 * np.log(ppl)}},
            "config": {"model_args": f"pretrained=facebook/{model},revision=step{step}"}}
    (results / f"r{i}.json").write_text(json.dumps(data))
  out = str(tmp_path / "out")
  outcome = downstream_icl.run(downstream_icl.Settings(
      suite=str(manifest), out=out, lm_eval_results=str(results), tasks=("hellaswag", "piqa"),
      plots=False))
  table = outcome.table
  assert len(table) == 12 and (table["accuracy_summed"] == table["accuracy"]).all()
  corr = pd.read_csv(os.path.join(out, "correlations.csv")).set_index("x")
  assert corr.loc["validation_ppl", "spearman"] == pytest.approx(-1.0)
  assert corr.loc["validation_ppl", "r2"] == pytest.approx(1.0)
  assert corr.loc["validation_ppl", "r2"] > corr.loc["flops", "r2"]
  summary = open(os.path.join(out, "summary.md")).read()
  assert "What predicts mean accuracy" in summary and "(n = 6)" in summary


def test_empty_bigbench_dir_means_cloze_tasks_only(tmp_path, monkeypatch):
  # Even when a fetched BIG-bench copy exists at the default path, "" must not load it.
  monkeypatch.setattr(icl_tasks, "default_bigbench_dir",
                      lambda: pytest.fail("the default BIG-bench cache must not be consulted"))
  text = tmp_path / "held_out.txt"
  text.write_text("\n".join(f"line {i} of the held out text, with words like king and crown "
                            f"and {i % 7} ghosts" for i in range(200)))
  got = icl_tasks.load_tasks("", None, [str(text)], cloze_examples=10)
  assert got.tasks and all(t.name.startswith("cloze") for t in got.tasks)
  assert not got.failures and any("BIG-bench disabled" in n for n in got.notes)
  with pytest.raises(ValueError, match="nothing to evaluate"):
    icl_tasks.load_tasks("", None, [])


def test_without_validation_ppl_plots_skip_what_has_no_data(env, tmp_path):
  """Issue: without --validation_ppl the run scored everything, wrote the CSVs, then died in
  matplotlib ("Data cannot be log-scaled because all values are <= 0")."""
  table = env["table"].assign(validation_ppl=np.nan)
  a, skipped = downstream_icl.analyze_and_report(table, str(tmp_path), n_bins=2, top_k=2,
                                                 plots=True)
  assert skipped == ["plots against validation perplexity not drawn: no checkpoint has a positive "
                     "value (no --validation_ppl or --validation_text)"]
  plots = sorted(os.listdir(tmp_path / "plots"))
  assert plots == ["final_option_ppl.pdf", "final_option_ppl.png", "mean_accuracy.pdf",
                   "mean_accuracy.png"]
  summary = (tmp_path / "summary.md").read_text()
  assert "plots against validation perplexity not drawn" in summary
  assert "the paper's claim cannot be tested" in summary
  assert "no perplexity correlation" in " ".join(icl.headline(a, 0))


def test_misspelled_task_names_the_closest_known_ones(env):
  settings = env["settings"].replace(tasks=("anachronism", "emoji_movei", "zzz"),
                                     out=os.path.join(env["root"], "typo"))
  with pytest.raises(InputError) as e:
    downstream_icl.run(settings, progress=False)
  msg = str(e.value)
  assert "no task 'anachronism'" in msg and "(closest: anachronisms)" in msg
  assert "no task 'emoji_movei'" in msg and "(closest: emoji_movie)" in msg
  assert "no task 'zzz'" in msg and "(closest: none)" in msg
  assert not os.path.exists(os.path.join(env["root"], "typo", "store"))
  with pytest.raises(InputError, match="cannot be combined"):
    downstream_icl.Settings(suite=env["suite"], out="x", tasks=("rule", "anachronisms"))


def test_the_papers_74_tasks_with_a_synthetic_sports_understanding(tmp_path):
  """The shared files lack sports_understanding (1000 examples in bigbench 1.0.0, one too many
  for the selection rule): the default list takes it, --tasks=rule drops it."""
  assert len(bb.PAPER_TASKS) == len(set(bb.PAPER_TASKS)) == 74
  assert "sports_understanding" in bb.PAPER_TASKS and "periodic_elements" in bb.PAPER_TASKS
  assert set(bb.LINEARITY_TASKS) | set(bb.BREAKTHROUGHNESS_TASKS) <= set(bb.PAPER_TASKS)
  assert (len(bb.LINEARITY_TASKS), len(bb.BREAKTHROUGHNESS_TASKS)) == (12, 6)
  bench = tmp_path / "bench"
  _write_task(str(bench / "sports_understanding"),
              [{"input": f"Is sentence {i} plausible?", "target_scores": {"yes": i % 2,
                                                                       "no": 1 - i % 2}}
               for i in range(1000)])
  _write_task(str(bench / "good"), [{"input": "q", "target_scores": {"a": 1, "b": 0}}] * 3)
  _write_task(str(bench / "two_right"), [{"input": "q", "target_scores": {"a": 1, "b": 1}}] * 3)
  _write_task(str(bench / "broken"), [{"input": "q", "target_scores": {"a": 1, "b": 0}},
                                      {"input": "q", "target_scores": "a"}])
  got = icl_tasks.load_tasks(str(bench), None)
  assert [t.name for t in got.tasks] == ["sports_understanding"]
  assert got.missing == [t for t in bb.PAPER_TASKS if t != "sports_understanding"]
  assert any("3 other task(s) there not evaluated" in n for n in got.notes)
  lines = icl_tasks.skip_lines(got)
  assert lines == [f"73 of the paper's 74 tasks not in --bigbench_dir: "
                   f"{', '.join(got.missing[:8])} ... (summary.md lists all)"]
  ruled = icl_tasks.load_tasks(str(bench), ["rule"])
  assert [t.name for t in ruled.tasks] == ["good"]
  assert ruled.dropped["sports_understanding"] == "1000 examples (the rule needs fewer than 1000)"
  assert ruled.dropped["two_right"].startswith("3 examples do not have exactly one option")
  assert "broken" in ruled.failures and "example 1" in ruled.failures["broken"]
  assert icl_tasks.skip_lines(ruled)[0].startswith("task broken: ")


def test_rule_selection_reports_each_task_it_drops(tmp_path):
  bench = tmp_path / "bench"
  _write_task(str(bench / "good"), [{"input": "q", "target_scores": {"a": 1, "b": 0}}] * 3)
  _write_task(str(bench / "two_right"), [{"input": "q", "target_scores": {"a": 1, "b": 1}}] * 3)
  _write_task(str(bench / "generative"), [{"input": "q", "target": "a"}] * 3)
  got = icl_tasks.load_tasks(str(bench), ["rule"])
  assert [t.name for t in got.tasks] == ["good"]
  assert got.dropped == {
      "generative": "3 of 3 examples are not multiple choice (first: subtask '' "
                    "example 0)",
      "two_right": "3 examples do not have exactly one option scored 1 (first: subtask '' "
                   "example 0)"}
  assert icl_tasks.skip_lines(got) == [
      "2 BIG-bench task(s) not selected by the paper's rule (generative, two_right; "
      "summary.md gives each reason)"]
