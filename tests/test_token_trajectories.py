"""experiments/token_trajectories.py end to end on a tiny suite, and the analysis outputs.

The suite (2 tiny sizes x 4 checkpoints, HF random init with a different seed per checkpoint,
saved with opt_jax.checkpoints.orbax_format.save, a byte-level BPE of the tests' one trainer)
is built once per module; HF PyTorch is the oracle of the per-token losses.
"""

import glob
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tokenizers

import _suite_util as U
import oracle
from _trajectory_util import log_steps, planted_losses
from experiments import token_trajectories as tt
from experiments.analysis import trajectories, trends
from opt_jax.checkpoints import orbax_format

SIZES = {"tiny-s": U.SIZES["tiny-a"], "tiny-m": U.SIZES["tiny-b"]}
STEPS = (100, 200, 300, 400)
CONTEXT, STRIDE = 32, 16
TEXT = (
    "The old library stood at the end of the lane, and every evening the keeper lit its lamps. "
    "Children came to read about ships, stars and distant cities; the keeper wrote their names "
    "in a ledger. In the winter of 1901 the roof leaked, and the books were carried, one by one, "
    "to the school across the square. Nobody lost a page. When spring came the roof was mended "
    "and the books went home again, carried by the same small hands that had read them.")


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
  """(suite.json path, corpus path, {(model, step): HF model}, root)."""
  root = tmp_path_factory.mktemp("tiny_suite")
  # Byte-level BPE with OPT's special ids (<s>=0, <pad>=1, </s>=2, <unk>=3).
  tok_file = U.train_tokenizer(str(root), vocab_size=320, texts=[TEXT] * 3)
  hf_models, entries = {}, []
  for i, (name, config) in enumerate(SIZES.items()):
    ckpts = {}
    for j, step in enumerate(STEPS):
      hf = oracle.hf_model(config, seed=10 * i + j + 1)
      hf_models[(name, step)] = hf
      rel = f"ckpt/{name}/step{step}"
      orbax_format.save(str(root / rel), oracle.params_from_hf_model(hf, config), config,
                        tokenizer_files=[tok_file])
      ckpts[str(step)] = rel
    entries.append({"name": name, "params": config.num_params(), "tokens_per_step": 2048,
                    "aliases": [f"org/{name}"], "checkpoints": ckpts})
  suite_path = root / "suite.json"
  suite_path.write_text(json.dumps({"name": "tiny", "models": entries}))
  corpus = root / "book.txt"
  corpus.write_text(TEXT)
  return str(suite_path), str(corpus), hf_models, root


@pytest.fixture(scope="module")
def first_run(tiny_suite):
  suite_path, corpus, _, root = tiny_suite
  out = str(root / "out")
  # A one-device mesh: the sharded restore and scoring path, on the one CPU device tests see.
  settings = tt.Settings(suite=suite_path, corpus=(corpus,), out=out, context_length=CONTEXT,
                         stride=STRIDE, start_fractions=(0.1, 0.5), mesh="data:-1")
  return out, tt.run(settings, progress=False).analysis, settings


def test_matrices_equal_hf_per_token_losses(tiny_suite, first_run):
  suite_path, corpus_path, hf_models, _ = tiny_suite
  out, result, _ = first_run
  tok = tokenizers.Tokenizer.from_file(os.path.join(os.path.dirname(suite_path), "tokenizer.json"))
  ids = [2] + tok.encode(TEXT, add_special_tokens=False).ids      # OPT: </s> first
  matrix_files = sorted(glob.glob(os.path.join(out, "store", "token_trajectories_matrix", "*",
                                               "*.npz")))
  assert [os.path.basename(p) for p in matrix_files] == ["tiny-m.npz", "tiny-s.npz"]
  for name in SIZES:
    z = np.load(os.path.join(os.path.dirname(matrix_files[0]), f"{name}.npz"))
    losses = z["losses"]
    assert losses.dtype == np.float32 and losses.shape == (len(ids) - 1, len(STEPS))
    np.testing.assert_array_equal(z["token_ids"], ids[1:])
    np.testing.assert_array_equal(z["positions"], np.arange(1, len(ids)))
    np.testing.assert_array_equal(z["steps"], STEPS)
    # The first window sees the whole prefix: its CONTEXT losses are HF's on ids[:CONTEXT + 1].
    window = np.asarray([ids[:CONTEXT + 1]])
    for c, step in enumerate(STEPS):
      ref = -oracle.hf_logprobs(hf_models[(name, step)], window, np.ones_like(window))[0]
      np.testing.assert_allclose(losses[:CONTEXT, c], ref, atol=1e-4, rtol=0)
    # The last token is scored in a later window, after the CONTEXT tokens before it.
    window = np.asarray([ids[-CONTEXT - 1:]])
    ref = -oracle.hf_logprobs(hf_models[(name, STEPS[-1])], window, np.ones_like(window))[0, -1]
    np.testing.assert_allclose(losses[-1, -1], ref, atol=1e-4, rtol=0)
  assert result.fits[("tiny-s", 0.1)].codes.shape == (len(ids) - 1,)


def test_outputs_written(first_run):
  out, result, _ = first_run
  for name in ("trend_percentages.csv", "agreement.csv", "double_descent.csv",
               "double_descent_examples.csv", "group_means.csv", "cross_size.csv",
               "group_double_descent.csv", "token_labels_f0.1.csv", "token_labels_f0.5.csv",
               "summary.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  for stem in ("trend_percentages", "trend_groups_f0.1", "trend_groups_f0.5", "double_descent_f0.1",
               "cross_size_val_ppl", "cross_size_flops", "cross_size_step"):
    for ext in ("png", "pdf"):
      assert os.path.getsize(os.path.join(out, "plots", f"{stem}.{ext}")) > 1000
  pct = pd.read_csv(os.path.join(out, "trend_percentages.csv"))
  sums = pct.groupby(["start_fraction", "model"]).percent.sum()
  np.testing.assert_allclose(sums.to_numpy(), 100.0)
  assert set(pct.label) == set(trends.LABELS)
  # Every size on the tokens each reference (by default every size) selected at fraction 0.1.
  cross = pd.read_csv(os.path.join(out, "cross_size.csv"))
  assert set(zip(cross.reference_model, cross.model)) == {(a, b) for a in SIZES for b in SIZES}
  z = np.load(glob.glob(os.path.join(out, "store", "token_trajectories_matrix", "*",
                                     "tiny-m.npz"))[0])
  codes = result.selections["tiny-s"]
  rows = cross[(cross.reference_model == "tiny-s") & (cross.model == "tiny-m")]
  for k, label in enumerate(trends.TREND_LABELS):
    chosen = codes == k
    got = rows[rows.label == label].group_ppl.to_numpy()
    if chosen.any():
      np.testing.assert_allclose(got, np.exp(z["losses"][chosen].astype(np.float64).mean(0)),
                                 rtol=1e-6)
    else:
      assert np.isnan(got).all()
  gdd = pd.read_csv(os.path.join(out, "group_double_descent.csv"))
  assert len(gdd) == 2 and set(gdd.reference_model) == set(SIZES)
  agree = pd.read_csv(os.path.join(out, "agreement.csv"))
  assert set(agree.comparison) == {"matched_steps", "matched_ppl"}
  labels = pd.read_csv(os.path.join(out, "token_labels_f0.1.csv"))
  n = result.fits[("tiny-s", 0.1)].codes.shape[0]
  assert len(labels) == 2 * n and set(labels.model) == set(SIZES)
  assert not glob.glob(os.path.join(out, "**", "*.tmp*"), recursive=True)
  summary = open(os.path.join(out, "summary.md")).read()
  assert "token-weighted perplexity of the scored corpus itself" in summary
  assert f"context_length {CONTEXT}, stride {STRIDE}" in summary
  assert "(1 document, " in summary and "Group-level double descent" in summary
  assert result.seconds > 0 and f"Analysis time: {result.seconds:.2f} s" in summary


def _stored(out):
  return {p: os.stat(p).st_mtime_ns for p in glob.glob(
      os.path.join(out, "store", "token_trajectories", "**", "*.npz"), recursive=True)}


def _last_manifest(out):
  manifests = sorted(glob.glob(os.path.join(out, "runs", "*.json")), key=os.path.getmtime)
  return json.load(open(manifests[-1]))


def test_second_run_scores_nothing(first_run):
  out, _, settings = first_run
  before = _stored(out)
  assert len(before) == len(SIZES) * len(STEPS)
  # Analysis settings (start fractions, plots) are not part of the key: nothing is rescored.
  tt.run(settings.replace(start_fractions=(0.1,), plots=False), progress=False)
  assert _stored(out) == before
  assert _last_manifest(out)["evaluated"] == 0


def test_resumed_with_another_dtype_never_reuses_float32_results(first_run):
  """Issue: a run resumed with --dtype=bfloat16 into the same --out reused the float32 results
  (and an interrupted one mixed both in one matrix)."""
  out, _, settings = first_run
  before = _stored(out)
  bf16 = settings.replace(dtype="bfloat16", models=("tiny-s",), start_fractions=(0.1,),
                          plots=False)
  tt.run(bf16, progress=False)
  manifest = _last_manifest(out)
  assert manifest["evaluated"] == len(STEPS) and manifest["run_info"]["settings"]["dtype"] == (
      "bfloat16")
  after = _stored(out)
  assert {p: t for p, t in after.items() if p in before} == before   # float32 results untouched
  new = sorted(set(after) - set(before))
  assert len(new) == len(STEPS) and all("tiny-s" in p for p in new)
  old = [p for p in before if os.sep + "tiny-s" + os.sep in p and p.endswith("400.npz")]
  f32, b16 = np.load(old[0])["logprobs"], np.load(new[-1])["logprobs"]
  assert f32.shape == b16.shape and 1e-4 < np.abs(f32 - b16).max() < 0.5


def test_stale_result_with_other_token_count_is_a_clear_error(tiny_suite, first_run, tmp_path):
  suite_path, corpus, _, _ = tiny_suite
  out = str(tmp_path / "out")
  shutil.copytree(first_run[0], out)
  victim = glob.glob(os.path.join(out, "store", "token_trajectories", "*", "tiny-m", "200.npz"))
  assert len(victim) == 1
  z = dict(np.load(victim[0]))
  z["logprobs"] = z["logprobs"][:-3]
  np.savez(victim[0], **z)
  with pytest.raises(ValueError, match=r"tiny-m.*200\.npz.*expected \d+.*mismatched token counts"):
    tt.run(first_run[2].replace(out=out, plots=False), progress=False)


def test_bad_inputs_fail_before_scoring_with_the_cause(tiny_suite, tmp_path):
  suite_path, corpus, _, _ = tiny_suite
  out = str(tmp_path / "out")
  base = tt.Settings(suite=suite_path, corpus=(corpus,), out=out, context_length=CONTEXT,
                     start_fractions=(0.1,))
  run = lambda **kw: tt.run(base.replace(**kw), progress=False)
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  with pytest.raises(ValueError, match="empty.txt is empty"):
    run(corpus=(str(empty),))
  short = tmp_path / "short.txt"
  short.write_text("The keeper lit its lamps.")
  with pytest.raises(ValueError, match=r"short\.txt has \d+ tokens \(after .*\), shorter than "
                                       r"one window of context_length=32"):
    run(corpus=(str(short),))
  with pytest.raises(ValueError, match=r"start fraction 0\.9 keeps 1 checkpoint"):
    run(start_fractions=(0.1, 0.9))
  with pytest.raises(ValueError, match=r"'tiny-s': selection fraction 0\.8 keeps 2 checkpoint"):
    run(selection_fraction=0.8)
  with pytest.raises(ValueError, match=r"--reference_models: .*tiny-x"):
    run(reference_models=("tiny-x",))
  with pytest.raises(ValueError, match=r"--context_length=100: expected 2 to 64"):
    run(context_length=100)
  with pytest.raises(ValueError, match=r"--stride=0: expected an integer >= 1"):
    run(stride=0)
  with pytest.raises(ValueError, match=r"--context_length=0: expected an integer >= 2"):
    run(context_length=0)
  assert not os.path.exists(os.path.join(out, "store"))


def test_suite_with_step_zero_runs_and_fails_early_where_a_fit_would_start_at_it(
    tiny_suite, first_run, tmp_path):
  """Issue: a real Pythia suite has step 0; the run crashed after the sweep though no fit kept it."""
  suite_path, corpus, _, root = tiny_suite
  manifest = json.loads(open(suite_path).read())
  small = next(m for m in manifest["models"] if m["name"] == "tiny-s")
  ckpts = small["checkpoints"]
  small["checkpoints"] = {"0": ckpts["100"], **{k: v for k, v in ckpts.items() if k != "100"}}
  manifest["models"] = [small]
  step0 = root / "suite_step0.json"
  step0.write_text(json.dumps(manifest))
  out = str(tmp_path / "out")
  settings = first_run[2].replace(suite=str(step0), out=out)
  # Fraction 0.1 of step 400 is nearest step 0: refused before anything is scored.
  with pytest.raises(ValueError, match=r"'tiny-s': start fraction 0\.1 starts at step 0"):
    tt.run(settings, progress=False)
  assert not os.path.exists(os.path.join(out, "store"))
  result = tt.run(settings.replace(start_fractions=(0.5,), selection_fraction=0.5),
                  progress=False).analysis
  assert result.fits[("tiny-s", 0.5)].steps.tolist() == [200, 300, 400]
  groups = pd.read_csv(os.path.join(out, "group_means.csv"))
  assert groups.step.min() == 0 and os.path.getsize(os.path.join(out, "plots",
                                                                 "cross_size_step.png")) > 1000


def test_validation_ppl_csv_is_read_by_name_or_alias(tiny_suite, tmp_path):
  from experiments import perplexity
  from opt_jax.suite import load_suite
  suite = load_suite(tiny_suite[0])
  csv = tmp_path / "validation_ppl.csv"
  rows = [{"model": "org/tiny-s" if m.name == "tiny-s" else m.name, "step": s, "corpus": c,
           "ppl": 100.0 / (k + 1) + (c == "b")} for m in suite.models for k, s in enumerate(STEPS)
          for c in ("a", "b")]
  pd.DataFrame(rows).to_csv(csv, index=False)
  with pytest.raises(ValueError, match=r"several corpora \['a', 'b'\]"):
    perplexity.read_validation_ppl(str(csv), suite)
  got = perplexity.read_validation_ppl(str(csv), suite, corpus="b")
  assert got[("tiny-s", 300)] == pytest.approx(100.0 / 3 + 1)
  pd.DataFrame(rows[:8]).to_csv(csv, index=False)
  with pytest.raises(ValueError, match="no validation perplexity for model 'tiny-m'"):
    perplexity.read_validation_ppl(str(csv), suite, corpus="a")


class _CharTokenizer:
  """One id per character after </s> (2): enough to pin down corpus bookkeeping."""

  def encode_batch(self, texts):
    return [[2] + [ord(ch) for ch in t] for t in texts]

  def encode_documents(self, texts):   # native convention: the </s> prefix is the context
    return self.encode_batch(texts)


def test_corpus_rows_and_truncation_keep_documents_in_order():
  corpus = tt.tokenize_corpus(["a.txt", "b.txt", "c.txt"], ["abc", "de", "fgh"], _CharTokenizer())
  assert corpus.token_ids.tolist() == [97, 98, 99, 100, 101, 102, 103, 104]
  assert corpus.positions.tolist() == [1, 2, 3, 1, 2, 1, 2, 3]
  assert corpus.document.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
  cut = tt.select_tokens(corpus, max_tokens=4)
  assert cut.documents == [[2, 97, 98, 99], [2, 100]]
  assert cut.token_ids.tolist() == [97, 98, 99, 100] and cut.document.tolist() == [0, 0, 0, 1]
  short = tt.select_tokens(corpus, max_tokens=2)
  assert short.documents == [[2, 97, 98]] and short.names == ["a.txt"]
  # The paper's selection: the first N tokens of each of the first M documents.
  each = tt.select_tokens(corpus, max_documents=2, document_tokens=2)
  assert each.documents == [[2, 97, 98], [2, 100, 101]] and each.names == ["a.txt", "b.txt"]
  assert each.positions.tolist() == [1, 2, 1, 2] and each.document.tolist() == [0, 0, 1, 1]
  both = tt.select_tokens(corpus, document_tokens=2, max_tokens=5)
  assert both.token_ids.tolist() == [97, 98, 100, 101, 102]
  assert tt.select_tokens(corpus).documents == corpus.documents


# --- the analysis on planted trajectories ------------------------------------------------------

def test_analyze_finds_planted_tokens_in_its_tables(tmp_path):
  steps = log_steps(30)
  small, kinds = planted_losses(steps, seed=0)
  big, _ = planted_losses(steps, seed=1)
  models = [trajectories.ModelTrajectories("small", steps, small, tokens=steps * 1e3,
                                           flops=steps * 6e9, val_ppl=np.geomspace(200, 20, 30)),
            trajectories.ModelTrajectories("big", steps, big, tokens=steps * 1e3,
                                           flops=steps * 6e10, val_ppl=np.geomspace(150, 8, 30))]
  ids = np.arange(len(kinds)) + 1000
  result = trajectories.analyze(models, ids, np.arange(len(kinds)), start_fractions=(0.1,),
                                num_examples=3, ema=0.5, min_rise=0.1,   # small planted moves
                                describe_token=lambda row: f"ctx [[{row}]]")
  labels = result.token_labels(models, 0.1)
  for name in ("small", "big"):
    rows = labels[labels.model == name]
    assert (rows.label[kinds == "upward"] == "upward").all()
    assert (rows.label[kinds == "downward"] == "downward").all()
    assert rows.double_descent.tolist() == (kinds == "double_descent").tolist()
    np.testing.assert_array_equal(rows.token_id, ids)
  tables = result.tables()
  dd = tables["double_descent"].set_index("model")
  planted = int((kinds == "double_descent").sum())
  assert dd.loc["small", "n_double_descent"] == planted
  n_up = int((labels[labels.model == "small"].label == "upward").sum())
  assert dd.loc["small", "fraction_of_upward"] == pytest.approx(planted / n_up)
  examples = tables["double_descent_examples"]
  assert len(examples) == 6 and (kinds[examples.token_index] == "double_descent").all()
  assert examples.context.iloc[0] == f"ctx [[{examples.token_index.iloc[0]}]]"
  # Group curves are exp(mean loss) over each label's tokens.
  means = tables["group_means"]
  down = means[(means.model == "big") & (means.label == "downward")].group_ppl.to_numpy()
  codes = result.fits[("big", 0.1)].codes
  np.testing.assert_allclose(down, np.exp(big[codes == trends.DOWNWARD].astype(np.float64).mean(0)))
  summary = trajectories.summary_markdown(result, models)
  assert "| 0.1 | small |" in summary and "ctx [[" in summary
