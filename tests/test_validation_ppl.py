"""experiments/validation_ppl.py: token-weighted perplexity per checkpoint and corpus vs HF."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

import _suite_util as U
from experiments import perplexity
from experiments.analysis import ppl_breaks
from experiments import validation_ppl as V
from oracle import hf_logprobs
from opt_jax import families, suite
from opt_jax.checkpoints import checkpoint
from opt_jax.convert import hf
from opt_jax.errors import InputError
from opt_jax.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("vppl")
  s = suite.load_suite(U.make_suite(str(root)))
  book = root / "book.txt"
  book.write_text(U.CORPUS[0] + "\nThe end.\n")
  web = root / "web.jsonl"
  web.write_text("\n".join([json.dumps({"text": U.CORPUS[2]}), json.dumps(U.CORPUS[3]), "",
                            json.dumps({"text": ""}), json.dumps({"text": U.CORPUS[4]})]) + "\n")
  out = root / "out"
  # One window per document (context 64 = max_position_embeddings) so HF scores each in one pass.
  settings = V.Settings(suite=s.source, out=str(out), corpus=(str(book), str(web)),
                        context_length=64, batch_size=4)
  outcome = V.run(settings, progress=False)
  return s, settings, out, outcome.table, outcome.summary


def _hf_model(params, config):
  model = transformers.OPTForCausalLM(transformers.OPTConfig(**families.to_hf_dict(config))).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           hf.state_dict_from_params(params, config).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model.tie_weights()
  return model


def test_perplexity_matches_hf_oracle(setup):
  s, _, out, df, _ = setup
  docs = {"book": [U.CORPUS[0] + "\nThe end.\n"],
          "web": [U.CORPUS[2], U.CORPUS[3], U.CORPUS[4]]}
  assert list(df.columns) == perplexity.COLUMNS + ppl_breaks.BREAK_COLUMNS
  assert df.breaks_from_neighbours.dtype == bool
  assert "## Checkpoints that break from their neighbours" in (out / "summary.md").read_text()
  assert len(df) == 8 * 3 and set(df["corpus"]) == {"book", "web", "all"}
  on_disk = pd.read_csv(out / V.CSV_NAME)
  assert list(on_disk.columns) == perplexity.COLUMNS + ppl_breaks.BREAK_COLUMNS
  assert len(on_disk) == len(df)
  for name, step in (("tiny-a", 20), ("tiny-b", 40)):
    m = s.model(name)
    config = checkpoint.load_config(m.path(step))
    hf = _hf_model(checkpoint.restore(m.path(step)), config)
    tok = load_tokenizer(m.path(step))
    sums, counts = {}, {}
    for corpus, texts in docs.items():
      nll, n = 0.0, 0
      for text in texts:
        ids = np.array([tok.encode(text)])
        assert ids.shape[1] <= 64
        nll -= hf_logprobs(hf, ids, np.ones_like(ids)).sum()
        n += ids.shape[1] - 1                    # every token after the leading </s>
      sums[corpus], counts[corpus] = nll, n
    sums["all"], counts["all"] = sum(sums.values()), sum(counts.values())
    for corpus in ("book", "web", "all"):
      row = df[(df.model == name) & (df.step == step) & (df.corpus == corpus)].iloc[0]
      assert row["num_tokens"] == counts[corpus]
      np.testing.assert_allclose(row["nll"], sums[corpus] / counts[corpus], rtol=2e-5)
      np.testing.assert_allclose(row["ppl"], math.exp(row["nll"]), rtol=1e-6)
      assert row["tokens"] == step * U.TOKENS_PER_STEP
      assert row["flops"] == 6.0 * m.params * step * U.TOKENS_PER_STEP
  for x in ("steps", "flops"):
    with open(out / f"validation_ppl_vs_{x}.png", "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out / f"validation_ppl_vs_{x}.pdf", "rb") as f:
      assert f.read(5) == b"%PDF-"


def _last_run(out):
  runs = sorted(os.listdir(out / "runs"), key=lambda n: os.path.getmtime(out / "runs" / n))
  with open(out / "runs" / runs[-1]) as f:
    return json.load(f)


def test_rerun_scores_nothing_and_new_windows_score_again(setup):
  s, settings, out, first, _ = setup
  again = V.run(settings.replace(plots=False), progress=False).table
  assert _last_run(out)["evaluated"] == 0
  pd.testing.assert_frame_equal(again, first)
  # Other windows are other numbers: a new key space, every checkpoint scored again.
  slid = V.run(settings.replace(out=str(out / "slid"), context_length=16, stride=8, plots=False),
               progress=False).table
  assert _last_run(out / "slid")["evaluated"] == 8
  # Each token is still scored exactly once; with at most 15 tokens of context the values move.
  np.testing.assert_array_equal(slid["num_tokens"], first["num_tokens"])
  assert np.abs(slid["nll"].to_numpy() - first["nll"].to_numpy()).max() > 1e-3


def test_closing_summary_names_the_checkpoints_headline_and_files(setup):
  _, _, out, df, summary = setup
  text = summary.render(12.0)
  assert text.splitlines()[0] == "== validation_ppl finished in 12.0 s"
  assert "tiny: 8 checkpoints (8 evaluated now, 0 already in" in text
  last = df[(df.corpus == "all") & (df.model == "tiny-b") & (df.step == 40)].iloc[0]
  printed = float(re.search(r"tiny-b ([0-9.e+]+) \(step 40\)", text).group(1))
  assert printed == pytest.approx(last.ppl, rel=6e-4)
  assert "skipped:   1 empty document(s) of " in text and "web.jsonl" in text
  assert f"outputs:   {out}/ validation_ppl.csv" in text


def test_read_validation_ppl_for_other_experiments(setup):
  s, _, out, df, _ = setup
  pooled = perplexity.read_validation_ppl(out, s)
  assert len(pooled) == 8
  row = df[(df.model == "tiny-b") & (df.step == 30) & (df.corpus == "all")].iloc[0]
  np.testing.assert_allclose(pooled[("tiny-b", 30)], row["ppl"], rtol=1e-7)
  book = perplexity.read_validation_ppl(out / V.CSV_NAME, s, corpus="book")
  assert book[("tiny-a", 10)] == pytest.approx(
      df[(df.model == "tiny-a") & (df.step == 10) & (df.corpus == "book")]["ppl"].iloc[0])
  with pytest.raises(ValueError, match="no corpus 'wiki'"):
    perplexity.read_validation_ppl(out, s, corpus="wiki")


def test_binary_runs_resumes_and_closes_with_a_summary(setup):
  s, settings, out, _, _ = setup
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.validation_ppl", f"--suite={s.source}",
       f"--corpus={','.join(settings.corpus)}", f"--out={out}", "--context_length=64",
       "--batch_size=4"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "== validation_ppl finished in" in proc.stdout and "tiny-b" in proc.stdout
  assert "(0 evaluated now, 8 already in" in proc.stdout
  run = _last_run(out)
  assert run["evaluated"] == 0 and run["run_info"]["settings"]["context_length"] == 64
  assert run["run_info"]["settings"]["corpus"] == list(settings.corpus)


def test_a_damaged_checkpoint_is_left_out_and_named_in_the_summary(setup, tmp_path):
  s, settings, _, df, _ = setup
  root = tmp_path / "copy"
  shutil.copytree(os.path.dirname(s.source), root)
  bad = root / "ckpt" / "tiny-a" / "step20"
  os.remove(bad / "params" / "layers.mlp.down_kernel" / "0.0.0")
  damaged = settings.replace(suite=str(root / "suite.json"), out=str(tmp_path / "out"),
                             models=("tiny-a",), plots=False)
  # Strict: the integrity check finds the missing chunk before anything is evaluated ...
  with pytest.raises(InputError, match=r"tiny-a step 20: .*layers.mlp.down_kernel: chunk 0.0.0 "
                                       r"is missing"):
    V.run(damaged.replace(strict_integrity=True), progress=False)
  # ... by default it leaves that checkpoint out, names it and evaluates the rest ...
  outcome = V.run(damaged, progress=False)
  assert sorted(set(outcome.table["step"])) == [10, 30, 40]
  assert ("tiny-a step 20 left out by the integrity check: " in outcome.summary.render())
  # ... and without the check, the sweep leaves the checkpoint out and names it.
  damaged = damaged.replace(out=str(tmp_path / "out2"))
  outcome = V.run(damaged.replace(skip_integrity_check=True), progress=False)
  table = outcome.table
  assert sorted(set(table["step"])) == [10, 30, 40]       # the others are all there
  # (The neighbour ratios change with a checkpoint left out; the perplexities do not.)
  pd.testing.assert_frame_equal(
      table.drop(columns=ppl_breaks.BREAK_COLUMNS).reset_index(drop=True),
      df[(df.model == "tiny-a") & (df.step != 20)].drop(
          columns=ppl_breaks.BREAK_COLUMNS).reset_index(drop=True))
  text = outcome.summary.render()
  assert "tiny: 4 checkpoints (3 evaluated now, 0 already in" in text and "1 failed)" in text
  assert f"tiny tiny-a step 20 failed and is left out: restoring {bad} failed" in text
