"""End to end: downstream_icl on a tiny suite (2 sizes x 3 random checkpoints, tiny BPE), a few
shared BIG-bench tasks and cloze tasks; the numbers checked against a direct forward pass."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from _suite_util import make_suite
from experiments import downstream_icl
from experiments.analysis import icl
from experiments.tasks import bigbench as bb
from opt_jax import families
from opt_jax.errors import InputError

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bigbench")
TASKS = ("anachronisms", "entailed_polarity", "emoji_movie")
SIZES = {
    "tiny-a": families.get("opt").config(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, ffn_dim=64,
                                         max_position_embeddings=128),
    "tiny-b": families.get("opt").config(vocab_size=320, hidden_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, ffn_dim=96,
                                         max_position_embeddings=128),
}
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


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  if not os.path.isdir(SHARED):
    pytest.skip("../shared/data/bigbench absent")
  root = str(tmp_path_factory.mktemp("icl"))
  suite = make_suite(os.path.join(root, "suite"), SIZES, steps=STEPS)
  # A BIG-bench folder: links to three shared tasks plus a malformed one.
  bench = os.path.join(root, "bigbench")
  os.makedirs(os.path.join(bench, "broken"))
  for t in TASKS:
    os.symlink(os.path.abspath(os.path.join(SHARED, t)), os.path.join(bench, t))
  with open(os.path.join(bench, "broken", "task.json"), "w") as f:
    json.dump({"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}},
                            {"input": "q", "target_scores": "a"}]}, f)
  text = os.path.join(root, "held_out.txt")
  with open(text, "w") as f:
    f.write(TEXT)
  out = os.path.join(root, "out")
  # Plots are drawn once below (analyze_and_report, what run calls per k) to keep the test short.
  settings = downstream_icl.Settings(
      suite=suite, out=out, bigbench_dir=bench, cloze_text=(text,), cloze_examples=4,
      k_shot=(0, 1), max_examples=3, validation_text=(text,), batch_size=4, n_bins=2, top_k=2,
      plots=False)
  outcome = downstream_icl.run(settings, progress=False)
  table = outcome.table
  downstream_icl.analyze_and_report(table[table["k_shot"] == 0], os.path.join(root, "plotted"),
                                    n_bins=2, top_k=2, plots=True)
  return {"root": root, "suite": suite, "out": out, "table": table, "settings": settings,
          "summary": outcome.summary, "bench": bench}


def test_results_table_has_every_checkpoint_task_and_k(env):
  df = pd.read_csv(os.path.join(env["out"], "icl_results.csv"))
  assert list(df.columns) == list(icl.RESULT_COLUMNS) + ["k_shot"]
  tasks = sorted(TASKS + ("cloze_next_line", "cloze_next_word"))
  assert sorted(df["task"].unique()) == tasks
  assert len(df) == 2 * 3 * len(tasks) * 2
  assert set(df["k_shot"]) == {0, 1}
  assert (df["n"][df["task"].isin(TASKS)] == 3).all()
  rb = df.groupby("task")["random_baseline"].first()
  assert rb["anachronisms"] == 0.5 and rb["emoji_movie"] == pytest.approx(0.2)
  assert rb["cloze_next_word"] == 0.25
  first = df[(df["model"] == "tiny-b") & (df["step"] == 30)].iloc[0]
  assert first["params"] == SIZES["tiny-b"].num_params()
  assert first["tokens"] == 30 * 1000 and first["flops"] == 6.0 * first["params"] * 30 * 1000
  ppl = df.groupby(["model", "step"])["validation_ppl"].first()
  assert (ppl > 1).all() and ppl.nunique() == 6  # every checkpoint its own perplexity
  assert ((df["accuracy"] >= 0) & (df["accuracy"] <= 1)).all()


def test_numbers_match_a_direct_forward_pass(env):
  """anachronisms, k=0, tiny-a step 20: option log-probs from an unbatched, uncached forward pass
  with a full log-softmax (not the Scorer), encoded independently."""
  import jax
  import jax.numpy as jnp

  from opt_jax import checkpoint
  from opt_jax import model as M
  from opt_jax.tokenizer import load_tokenizer

  path = os.path.join(env["root"], "suite", "ckpt", "tiny-a", "step20")
  config, params = checkpoint.load_config(path), checkpoint.restore(path)
  tok = load_tokenizer(path)
  task = bb.load_task(os.path.join(SHARED, "anachronisms"))
  length = config.max_position_embeddings

  @jax.jit
  def forward(ids, mask):
    hidden, _ = M.Decoder(config).apply({"params": params}, ids, mask)
    return M.logits(params, hidden)

  lps, ntoks, nchars, scores = [], [], [], []
  for r in bb.requests_for(task, k=0, max_examples=3):
    lp, nt = [], []
    for cont in r.continuations:
      ctx_ids = tok.encode(r.context)
      whole = tok.encode(r.context + cont)
      n_cont = len(whole) - len(ctx_ids)
      whole = whole[-(length + 1):]
      ids = np.full((1, length), config.pad_token_id, np.int32)
      mask = np.zeros((1, length), np.int32)
      ids[0, :len(whole) - 1], mask[0, :len(whole) - 1] = whole[:-1], 1
      logits = np.asarray(forward(jnp.asarray(ids), jnp.asarray(mask)), np.float64)[0]
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                             keepdims=True)) \
          - logits.max(-1, keepdims=True)
      targets = whole[1:]
      per_token = logp[np.arange(len(targets)), targets]
      lp.append(per_token[-n_cont:].sum())
      nt.append(n_cont)
    lps.append(lp)
    ntoks.append(nt)
    nchars.append([len(c) for c in r.continuations])
    scores.append(r.example.scores)
  expected = icl.task_metrics(lps, ntoks, nchars, scores)
  df = pd.read_csv(os.path.join(env["out"], "icl_results.csv"))
  row = df[(df["model"] == "tiny-a") & (df["step"] == 20) & (df["task"] == "anachronisms")
           & (df["k_shot"] == 0)].iloc[0]
  for key in ("accuracy", "accuracy_norm", "correct_option_ppl", "incorrect_option_ppl"):
    assert row[key] == pytest.approx(expected[key], rel=1e-4), key


def test_analysis_outputs_and_malformed_task_reported(env):
  out = env["out"]
  corr = pd.read_csv(os.path.join(out, "correlations.csv"))
  assert list(corr.columns[:4]) == ["x", "spearman", "r2", "n"]
  assert list(corr["x"]) == ["validation_ppl", "flops", "params"]
  assert corr.set_index("x").loc["validation_ppl", "n"] == 6
  for name in ("mean_accuracy.csv", "task_scaling.csv", "summary.md",
               os.path.join("k1shot", "correlations.csv"), os.path.join("k1shot", "summary.md")):
    assert os.path.isfile(os.path.join(out, name)), name
  for stem in ("mean_accuracy", "option_ppl", "top_linearity", "top_breakthroughness",
               "task_trajectories"):
    for ext in ("png", "pdf"):
      assert os.path.getsize(os.path.join(env["root"], "plotted", "plots", f"{stem}.{ext}")) > 0
  assert not os.path.exists(os.path.join(out, "plots"))  # plots=False draws nothing
  summary = open(os.path.join(out, "summary.md")).read()
  assert "Spearman rho" in summary and "0-shot prompts" in summary
  assert "broken" in summary and "example 1" in summary
  means = pd.read_csv(os.path.join(out, "mean_accuracy.csv"))
  assert len(means) == 6 and (means["n_tasks"] == 5).all()


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
  with pytest.raises(FileNotFoundError, match="fetch_bigbench"):
    downstream_icl.run(downstream_icl.Settings(suite=env["suite"],
                                               out=os.path.join(env["root"], "x"),
                                               bigbench_dir=os.path.join(env["root"], "nowhere")),
                       progress=False)


def test_results_are_written_as_lm_eval_files_that_import_back(env):
  from opt_jax import suite as suite_lib  # pylint: disable=import-outside-toplevel
  models = suite_lib.load_suite(env["suite"]).models
  tasks = sorted(env["table"]["task"].unique())
  cols = ["model", "step", "params", "tokens", "flops", "validation_ppl", "task", "n",
          "accuracy", "accuracy_norm"]
  for k, folder in ((0, env["out"]), (1, os.path.join(env["out"], "k1shot"))):
    back, problems = icl.import_lm_eval(os.path.join(folder, downstream_icl.LM_EVAL_DIR), models,
                                        tasks, ppl_task=icl.VALIDATION_TASK)
    assert problems == []
    want = env["table"][env["table"]["k_shot"] == k]
    key = ["model", "step", "task"]
    pd.testing.assert_frame_equal(back[cols].sort_values(key).reset_index(drop=True),
                                  want[cols].sort_values(key).reset_index(drop=True),
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
  assert len(table) == 12
  corr = pd.read_csv(os.path.join(out, "correlations.csv")).set_index("x")
  assert corr.loc["validation_ppl", "spearman"] == pytest.approx(-1.0)
  assert corr.loc["validation_ppl", "r2"] == pytest.approx(1.0)
  assert corr.loc["validation_ppl", "r2"] > corr.loc["flops", "r2"]
  summary = open(os.path.join(out, "summary.md")).read()
  assert "best predictor" in summary


def test_empty_bigbench_dir_means_cloze_tasks_only(tmp_path, monkeypatch):
  # Even when a fetched BIG-bench copy exists at the default path, "" must not load it.
  monkeypatch.setattr(downstream_icl, "default_bigbench_dir",
                      lambda: pytest.fail("the default BIG-bench cache must not be consulted"))
  text = tmp_path / "held_out.txt"
  text.write_text("\n".join(f"line {i} of the held out text, with words like king and crown "
                            f"and {i % 7} ghosts" for i in range(200)))
  got = downstream_icl.load_tasks("", None, [str(text)], cloze_examples=10)
  assert got.tasks and all(t.name.startswith("cloze") for t in got.tasks)
  assert not got.failures and any("BIG-bench disabled" in n for n in got.notes)
  with pytest.raises(ValueError, match="nothing to evaluate"):
    downstream_icl.load_tasks("", None, [])


def test_closing_summary_says_what_ran_and_what_was_skipped(env):
  text = env["summary"].render(3.0)
  assert text.startswith("== downstream_icl finished in 3.0 s")
  assert "5 tasks x k-shot 0,1:" in text and "tiny: 6 checkpoints (6 evaluated now" in text
  corr = pd.read_csv(os.path.join(env["out"], "correlations.csv")).set_index("x")
  rho = float(re.search(r"Spearman rho (-?[0-9.]+)", text).group(1))
  assert rho == pytest.approx(corr.loc["validation_ppl", "spearman"], abs=6e-4)
  assert "task broken: " in text and "example 1" in text
  assert f"outputs:   {env['out']}/ icl_results.csv, correlations.csv, summary.md" in text


def test_without_validation_ppl_plots_skip_what_has_no_data(env, tmp_path):
  """Issue: without --validation_ppl the run scored everything, wrote the CSVs, then died in
  matplotlib ("Data cannot be log-scaled because all values are <= 0")."""
  table = env["table"][env["table"]["k_shot"] == 0].assign(validation_ppl=np.nan)
  a, skipped = downstream_icl.analyze_and_report(table, str(tmp_path), n_bins=2, top_k=2,
                                                 plots=True)
  assert skipped == ["plots against validation perplexity not drawn: no checkpoint has a positive "
                     "value (no --validation_ppl or --validation_text)"]
  plots = sorted(os.listdir(tmp_path / "plots"))
  assert plots == ["mean_accuracy.pdf", "mean_accuracy.png"]
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


def test_tasks_dropped_by_the_selection_rule_are_listed_with_the_reason(tmp_path):
  bench = tmp_path / "bench"
  for name, examples in (("good", [{"input": "q", "target_scores": {"a": 1, "b": 0}}] * 3),
                         ("two_right", [{"input": "q", "target_scores": {"a": 1, "b": 1}}] * 3),
                         ("generative", [{"input": "q", "target": "a"}] * 3)):
    (bench / name).mkdir(parents=True)
    (bench / name / "task.json").write_text(json.dumps({"examples": examples}))
  got = downstream_icl.load_tasks(str(bench), None)
  assert [t.name for t in got.tasks] == ["good"]
  assert got.dropped == {
      "generative": "3 of 3 examples are not multiple choice (first: subtask '' "
                    "example 0)",
      "two_right": "3 examples do not have exactly one option scored 1 (first: subtask '' "
                   "example 0)"}
  lines = downstream_icl._skip_lines(got)
  assert lines == ["2 BIG-bench task(s) not selected by the paper's rule (generative, two_right; "
                   "summary.md gives each reason)"]
