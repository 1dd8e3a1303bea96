"""Sequence-level experiment end to end on a tiny suite (2 sizes x 3 checkpoints) and a second
family with another tokenizer; perplexities checked against a direct forward pass."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

import _suite_util as U
from experiments import sequence_generation as S
from experiments.analysis import sequences as A
from experiments.tasks import sequences as T
from opt_jax import generation
from opt_jax.checkpoints import checkpoint, orbax_format
from opt_jax import model as M
from opt_jax.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short documents (< 64 tokens each, the tiny models' context) dense in names and numbers.
DOCS = [
    "In 1848 Ada met Bob in Paris, and in 1851 Carl met Dora in Rome.",
    "Emma sold 12 maps to Frank in Oslo, then 30 more to Gina in Bern.",
    "By 1902 Hugo had 4,512 books; Ines kept 97 of them in Lima.",
    "Jack told Kate that 7 ships left Cork for Nice on day 19.",
    "Leo and Mia walked 25 miles from York to Hull in 1950.",
    "Nora paid 3.5 marks to Otto in Riga for 40 eggs and 2 hens.",
]
# The paper's defaults except the sizes (5 prompts of 5 tokens, 16 new tokens, 40-token
# passages); the extras (shuffling, swapped facts, plain samples) switched on once here.
SETTINGS = dict(num_prompts=5, max_new_tokens=16, num_passages=4, passage_tokens=40,
                noise_rates=(0.2, 0.6, 1.0), shuffle_rates=(0.3,), swaps_per_kind=2,
                batch_size=8, generation_batch_size=8, seed=3, sample_models=("tiny-a",))
GENERATED = [f"{c}_{m}" for c in ("ps-pl", "ps", "ps+pl", "pl", "pl-ps")
             for m in ("greedy", "nucleus")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("seqgen"))
  suite_path = U.make_suite(os.path.join(root, "a"), steps=(10, 20, 30))
  # A second family: one size (tiny-a's shape), two checkpoints, another tokenizer.
  # A byte-level BPE of another vocabulary size: its fingerprint differs from the suite's.
  tok_file = U.train_tokenizer(os.path.join(root, "b", "tok"), vocab_size=290, texts=DOCS * 4)
  config = U.SIZES["tiny-a"]
  ckpts = {}
  for j, step in enumerate((5, 15)):
    rel = f"ckpt/step{step}"
    orbax_format.save(os.path.join(root, "b", rel), U.random_params(config, seed=900 + j), config,
                      tokenizer_files=[tok_file])
    ckpts[str(step)] = rel
  cross_path = os.path.join(root, "b", "suite.json")
  with open(cross_path, "w") as f:
    json.dump({"name": "other", "models": [{"name": "other-a", "params": config.num_params(),
                                            "tokens_per_step": 500, "checkpoints": ckpts}]}, f)
  corpus = os.path.join(root, "valid.jsonl")
  with open(corpus, "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
  out = os.path.join(root, "out")
  settings = S.Settings(suite=suite_path, out=out, corpus=(corpus,), cross_suite=cross_path,
                        **SETTINGS)
  outcome = S.run(settings, progress=False)
  return dict(root=root, suite=suite_path, cross=cross_path, corpus=corpus, out=out,
              df=outcome.table, settings=settings, summary=outcome.summary)


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, ids, mask):
  hidden, _ = M.Decoder(config).apply({"params": params}, ids, mask)
  return M.logits(params, hidden)


def _direct_nll(path, full_lists, targets):
  """Summed NLL (float64 nats) of the last n tokens of each list: one plain forward per list
  (right-padded to the 64 positions of the tiny models), log-softmax in float64 here."""
  config = checkpoint.load_config(path)
  params = checkpoint.restore(path)
  total = 0.0
  for full, n in zip(full_lists, targets):
    ids = np.ones((1, 64), np.int32)
    ids[0, :len(full)] = full
    mask = (np.arange(64) < len(full)).astype(np.int32)[None]
    logits = np.asarray(_logits(config, params, ids, mask))[0, :len(full)].astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    total -= logp[np.arange(len(full) - 1), np.asarray(full)[1:]][-n:].sum()
  return total


def test_tables_cover_every_set_checkpoint_and_suite(world):
  df = world["df"]
  sets = list(dict.fromkeys(df["set"]))
  assert sets[:11] == GENERATED + ["sample_tiny-a"]
  assert sets[11:15] == ["clean", "replace_0.2", "replace_0.6", "replace_1"]
  assert {"shuffle_0.3", "facts_original", "facts_swapped"} <= set(sets)
  assert len(df) == len(sets) * (6 + 2)
  assert set(df["scored_by"]) == {"tiny", "other"}
  on_disk = pd.read_csv(os.path.join(world["out"], S.CSV_NAME))
  assert len(on_disk) == len(df) and list(on_disk.columns) == A.COLUMNS
  for kind in ("generated", "perturbed"):
    for x in ("valid_ppl", "flops"):
      for ext in ("png", "pdf"):
        for by in ("tiny", "other"):
          assert os.path.getsize(os.path.join(world["out"], "plots", f"{by}_{kind}_vs_{x}.{ext}"))
  for by in ("tiny", "other"):   # Figure 6 row 1 / Figure 5 left, and Figure 7 (other family)
    for ext in ("png", "pdf"):
      assert os.path.getsize(os.path.join(world["out"], "plots", f"{by}_final_vs_params.{ext}"))


def test_final_checkpoint_table_is_each_sizes_last_step(world):
  df = world["df"]
  final = pd.read_csv(os.path.join(world["out"], S.FINAL_CSV), keep_default_na=False)
  assert list(final.columns) == A.FINAL_COLUMNS
  sets = list(dict.fromkeys(df["set"]))
  assert len(final) == len(sets) * (2 + 1)   # tiny-a, tiny-b; other-a
  last = {"tiny-a": 30, "tiny-b": 30, "other-a": 15}
  for r in final.itertuples():
    assert r.step == last[r.model]
    want = df[(df["scored_by"] == r.scored_by) & (df["set"] == r.set) & (df["model"] == r.model)
              & (df["step"] == r.step)]["ppl"].iloc[0]
    np.testing.assert_allclose(r.ppl, want, rtol=1e-6)
  ps = final[final["set"] == "ps-pl_nucleus"].iloc[0]
  assert (ps.configuration, ps.method) == ("ps-pl", "nucleus")
  assert final[final["set"] == "clean"]["method"].tolist() == [""] * 3


def test_sequence_and_validation_ppl_match_a_direct_forward(world):
  df, out = world["df"], world["out"]
  suite = json.load(open(world["suite"]))
  path = os.path.join(os.path.dirname(world["suite"]), suite["models"][0]["checkpoints"]["20"])
  row = lambda s: df[(df["scored_by"] == "tiny") & (df["set"] == s) & (df["model"] == "tiny-a")
                     & (df["step"] == 20)].iloc[0]
  for name in ("ps-pl_nucleus", "replace_0.6"):
    seqs = T.load_set(os.path.join(out, "sets", f"{name}.jsonl"))
    nll = _direct_nll(path, [c + x for c, x in zip(seqs.context_ids, seqs.ids)],
                      [len(x) for x in seqs.ids])
    n = sum(map(len, seqs.ids))
    assert row(name)["num_tokens"] == n
    np.testing.assert_allclose(row(name)["ppl"], np.exp(nll / n), rtol=1e-4)
  tok = load_tokenizer(path)
  docs = tok.encode_batch(DOCS)
  assert max(map(len, docs)) <= 64   # one window each: the direct forward is the whole oracle
  nll = _direct_nll(path, docs, [len(d) - 1 for d in docs])
  np.testing.assert_allclose(row("clean")["valid_ppl"],
                             np.exp(nll / sum(len(d) - 1 for d in docs)), rtol=1e-4)


def test_other_family_scores_retokenised_text(world):
  df, out = world["df"], world["out"]
  path = os.path.join(os.path.dirname(world["cross"]), "ckpt", "step5")
  tok = load_tokenizer(path)
  assert tok.fingerprint() != load_tokenizer(os.path.join(
      os.path.dirname(world["suite"]), "tok")).fingerprint()
  seqs = T.load_set(os.path.join(out, "sets", "pl-ps_greedy.jsonl"))
  ctx = tok.encode_batch(seqs.contexts)
  tgt = tok.encode_batch(seqs.texts, add_bos=False)
  keep = [i for i, t in enumerate(tgt) if t]
  nll = _direct_nll(path, [ctx[i] + tgt[i] for i in keep], [len(tgt[i]) for i in keep])
  n = sum(len(tgt[i]) for i in keep)
  row = df[(df["scored_by"] == "other") & (df["set"] == "pl-ps_greedy")
           & (df["step"] == 5)].iloc[0]
  assert row["num_tokens"] == n and row["num_sequences"] == len(keep)
  np.testing.assert_allclose(row["ppl"], np.exp(nll / n), rtol=1e-4)


def test_generated_sets_are_the_decoders_output(world):
  """Each of the ten sets is the joint decoder's output for its (l1, l2) and method, from the
  first 5 tokens of the first 5 documents, with (small, large) = (tiny-a, tiny-b) at step 30."""
  out, settings = world["out"], world["settings"]
  root = os.path.dirname(world["suite"])
  manifest = json.load(open(os.path.join(out, "sets", "manifest.json")))
  gen = manifest["generation"]
  assert gen["small"] == "tiny-a@30" and gen["large"] == "tiny-b@30"
  assert gen["prompts"] == 5 and gen["prompt_source"] == "documents"
  tok = load_tokenizer(os.path.join(root, "tok"))
  prompts = [[tok.start_id] + tok.encode(d, add_bos=False)[:5] for d in DOCS[:5]]
  load = lambda name: (checkpoint.load_config(os.path.join(root, f"ckpt/{name}/step30")),
                       checkpoint.restore(os.path.join(root, f"ckpt/{name}/step30")))
  pair = [load("tiny-a"), load("tiny-b")]
  weights = {"ps-pl": (1, -1), "ps": (1, 0), "ps+pl": (1, 1), "pl": (0, 1), "pl-ps": (-1, 1)}
  for k, (config, w) in enumerate(weights.items()):
    for method in ("greedy", "nucleus"):
      seqs = T.load_set(os.path.join(out, "sets", f"{config}_{method}.jsonl"))
      assert seqs.context_ids == prompts and seqs.contexts == [tok.decode(p[1:]) for p in prompts]
      got, stats = generation.joint_generate(
          pair, w, prompts, max_new_tokens=16, top_p=settings.top_p, eos_id=None,
          sampler="greedy" if method == "greedy" else "sample", seed=settings.seed + k,
          fallback_model=0 if w[0] > w[1] else 1, batch_size=8)
      assert got == seqs.ids and all(len(x) == 16 for x in got), seqs.name
      assert seqs.texts == [tok.decode(x) for x in seqs.ids]
      assert gen["sets"][seqs.name]["fallback_steps"] == stats["fallback_steps"]
  assert gen["decode_seconds"] > 0
  assert f"decoded in {gen['decode_seconds']:.1f} s" in world["summary"].render()


def test_summary_answers_both_questions_with_the_numbers(world):
  df = world["df"]
  text = open(os.path.join(world["out"], "summary.md")).read()
  q1, q2 = text.split("## 2. ")[0], text.split("## 2. ")[1]
  assert "## 1. At the final checkpoints, does the perplexity of p_s - p_l rise" in q1
  final = df.sort_values("step").groupby(["scored_by", "set", "model"]).last()["ppl"]
  for method in ("greedy", "nucleus"):
    section = q1.split(f"### Scored by tiny, {method}")[1].split("###")[0]
    inv = [final["tiny", f"ps-pl_{method}", m] for m in ("tiny-a", "tiny-b")]
    clean = [final["tiny", "clean", m] for m in ("tiny-a", "tiny-b")]
    large = [final["tiny", f"pl_{method}", m] for m in ("tiny-a", "tiny-b")]
    assert f"{inv[0]:.4g} -> {inv[1]:.4g}" in section
    assert f"{clean[0]:.4g} -> {clean[1]:.4g}" in section
    yes = inv[1] > inv[0] and clean[1] < clean[0] and large[1] < large[0]
    assert ("**Yes.**" if yes else "**No.**") in section
    assert (f"x{inv[1] / inv[0]:.3g} from tiny-a to tiny-b") in section
  assert "### Scored by other (another family's checkpoints, Figure 7), greedy" in q1
  sub = df[(df["scored_by"] == "tiny") & (df["set"] == "ps-pl_greedy")]
  greedy = q2.split("### Scored by tiny, greedy")[1].split("###")[0]
  for model, g in sub.groupby("model"):
    g = g.sort_values("step")
    first, lowest, final_ = g["ppl"].iloc[0], g["ppl"].min(), g["ppl"].iloc[-1]
    rise = final_ / lowest - 1
    early = g["ppl"].iloc[1:2].min()   # 3 checkpoints: the first half is checkpoint 1
    falls = early < 0.95 * first
    rises = final_ > 1.05 * lowest and g["ppl"].idxmin() != g.index[-1]
    line = next(l for l in greedy.splitlines() if l.startswith(f"| {model} |"))
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    header = next(l for l in greedy.splitlines() if l.startswith("| model | params | first |"))
    col = [c.strip() for c in header.strip().strip("|").split("|")]
    assert float(cells[col.index("first")]) == pytest.approx(first, rel=6e-4), line
    pct = float(cells[col.index("rise")].rstrip("%"))
    assert pct == pytest.approx(100 * rise, abs=0.051), line
    assert line.rstrip().endswith(f"| {'yes' if falls else 'no'} | {'yes' if rises else 'no'} |")
  assert ("**Yes.**" in greedy) != ("**No.**" in greedy)
  first_greedy = final["tiny", "ps-pl_greedy", "tiny-a"]
  assert f"greedy: at the final checkpoints p_s - p_l {first_greedy:.4g}" in (
      world["summary"].render())


def test_rerun_reuses_sets_and_results(world):
  before = {f: os.path.getmtime(os.path.join(world["out"], "sets", f))
            for f in os.listdir(os.path.join(world["out"], "sets"))}
  df = S.run(world["settings"].replace(plots=False), progress=False).table
  pd.testing.assert_frame_equal(df, world["df"])
  after = {f: os.path.getmtime(os.path.join(world["out"], "sets", f)) for f in before}
  assert after == before


def test_bad_input_is_named(world, tmp_path):
  root, cross_root = os.path.dirname(world["suite"]), os.path.dirname(world["cross"])
  mixed = tmp_path / "mixed.json"
  mixed.write_text(json.dumps({"name": "mixed", "models": [
      {"name": "small-other", "params": U.SIZES["tiny-a"].num_params(), "tokens_per_step": 1,
       "checkpoints": {str(k): os.path.join(cross_root, "ckpt", f"step{k}") for k in (5, 15)}},
      {"name": "large-tiny", "params": U.SIZES["tiny-b"].num_params(), "tokens_per_step": 1,
       "checkpoints": {str(k): os.path.join(root, "ckpt", "tiny-b", f"step{k}")
                       for k in (20, 30)}}]}))
  with pytest.raises(ValueError, match=r"\['large-tiny'\] tokenize text differently from "
                                       "small-other"):
    S.run(world["settings"].replace(suite=str(mixed), out=str(tmp_path / "out"),
                                    sample_models=(), cross_suite=None), progress=False)
  assert not os.path.exists(tmp_path / "out" / "sets")
  empty = tmp_path / "prompts.txt"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match="prompts.txt: no prompt"):
    T.read_prompts(str(empty))
  bad = tmp_path / "prompts.jsonl"
  bad.write_text('{"prompt": "ok"}\n{"oops": 1}\n')
  with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected"):
    T.read_prompts(str(bad))
  csv = tmp_path / "validation_ppl.csv"
  csv.write_text("model,step,corpus,ppl\ntiny-a,10,valid,5.0\n")
  with pytest.raises(ValueError, match="no validation perplexity for model 'tiny-b'"):
    S.run(world["settings"].replace(validation_ppl=str(csv), out=str(tmp_path / "o2")),
          progress=False)
  assert not os.path.exists(tmp_path / "o2" / "sets")   # read before anything is decoded


def test_mesh_data2_model4_gives_the_same_sets_and_scores_as_one_device(world, tmp_path):
  """Decoding (sharded restore, generate/joint_generate with mesh=) and scoring on 8 simulated
  devices, in a subprocess (the device count is fixed when JAX starts), against the one-device
  run of the module's fixture."""
  from opt_jax import cli
  # Two configurations (greedy and nucleus), a plain sample and one corruption rate: every
  # decoding and scoring path, at a fraction of the module fixture's sets.
  settings = world["settings"].replace(out=str(tmp_path / "mesh"), mesh="data:2,model:4",
                                       cross_suite=None, plots=False, configurations=("1:-1",),
                                       noise_rates=(0.6,), shuffle_rates=(), swaps_per_kind=0)
  (tmp_path / "settings.json").write_text(json.dumps(cli.as_dict(settings)))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_sequence_mesh_child.py"),
                         str(tmp_path / "settings.json"), str(tmp_path / "result.json")],
                        env=U.child_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  got = json.load(open(tmp_path / "result.json"))
  assert got["devices"] == 8
  names = ["ps-pl_greedy", "ps-pl_nucleus", "sample_tiny-a", "clean", "replace_0.6"]
  assert sorted(got["sets"]) == sorted(names)
  for name in names:
    one = T.load_set(os.path.join(world["out"], "sets", f"{name}.jsonl"))
    assert got["sets"][one.name] == {"context_ids": one.context_ids, "ids": one.ids}, one.name
  a = world["df"][(world["df"]["scored_by"] == "tiny") & world["df"]["set"].isin(names)]
  a = a.reset_index(drop=True)
  b = pd.DataFrame(got["table"])
  pd.testing.assert_frame_equal(a.drop(columns=["nll", "ppl", "valid_ppl"]),
                                b.drop(columns=["nll", "ppl", "valid_ppl"]), check_dtype=False)
  for column in ("nll", "ppl", "valid_ppl"):
    np.testing.assert_allclose(b[column], a[column], rtol=2e-5, err_msg=column)
  runs = [json.load(open(tmp_path / "mesh" / "runs" / f))
          for f in os.listdir(tmp_path / "mesh" / "runs")]
  assert [r["mesh"] for r in runs] == [{"data": 2, "fsdp": 1, "model": 4}]


def test_long_prompts_keep_bos_and_their_last_tokens(world, tmp_path):
  tok = load_tokenizer(os.path.join(os.path.dirname(world["suite"]), "tok"))
  prompts = tmp_path / "p.txt"
  prompts.write_text("Ada met Bob.\n" + " ".join(["Carl met Dora in Rome."] * 10) + "\n")
  got = T.make_prompts(tok, DOCS, max_tokens=20, prompt_file=str(prompts))
  full = tok.encode(" ".join(["Carl met Dora in Rome."] * 10))
  assert got.truncated == 1 and got.ids[0] == tok.encode("Ada met Bob.")
  assert len(got.ids[1]) == 20 and got.ids[1] == [2] + full[-19:]
  assert got.texts[1] == tok.decode(full[-19:])


def test_document_prompts_are_the_first_tokens_of_each_document_in_order(world):
  tok = load_tokenizer(os.path.join(os.path.dirname(world["suite"]), "tok"))
  docs = ["Hi.", *DOCS]   # the first is too short for 5 tokens: passed over, counted
  assert len(tok.encode(docs[0], add_bos=False)) < 5
  got = T.make_prompts(tok, docs, max_tokens=48, num_prompts=10, prompt_tokens=5)
  want = [tok.encode(d, add_bos=False)[:5] for d in DOCS]
  assert got.ids == [[2] + w for w in want] and got.short_documents == 1
  assert got.texts == [tok.decode(w) for w in want]
  assert T.make_prompts(tok, docs, max_tokens=48, num_prompts=2).ids == [[2] + w
                                                                          for w in want[:2]]


def test_configuration_names_and_errors():
  assert [T.configuration_name(*c) for c in T.parse_configurations(T.PAPER_CONFIGURATIONS)] == [
      "ps-pl", "ps", "ps+pl", "pl", "pl-ps"]
  assert T.configuration_name(2, -0.5) == "2ps-0.5pl"
  for bad, match in (("1,-1", "is not l1:l2"), ("0:-1", "no positive weight"),
                     ("x:1", "is not l1:l2")):
    with pytest.raises(ValueError, match=match):
      T.parse_configurations(["1:1", bad])
  with pytest.raises(ValueError, match="repeated configuration"):
    T.parse_configurations(["1:1", "1.0:1"])


def test_integrity_problem_stops_the_run_before_decoding(world, tmp_path):
  """A suite whose two checkpoints hold the same weights fails the strict pre-check before any set
  is decoded or any folder written."""
  import shutil
  root = os.path.dirname(world["suite"])
  shutil.copytree(os.path.join(root, "ckpt", "tiny-a", "step10"), tmp_path / "copy")
  suite = json.load(open(world["suite"]))
  for m in suite["models"]:
    m["checkpoints"] = {k: os.path.join(root, v) for k, v in m["checkpoints"].items()}
  suite["models"][0]["checkpoints"]["20"] = str(tmp_path / "copy")
  (tmp_path / "dup.json").write_text(json.dumps(suite))
  with pytest.raises(ValueError, match="integrity check"):
    S.run(world["settings"].replace(suite=str(tmp_path / "dup.json"), out=str(tmp_path / "o"),
                                    cross_suite=None, strict_integrity=True), progress=False)
  assert not os.path.exists(tmp_path / "o" / "sets")


# The analysis on hand-made trajectories ------------------------------------------------------

def _table(curves):
  rows = []
  for params, (model, ppl) in enumerate(curves.items(), start=1):
    for i, p in enumerate(ppl):
      rows.append({"scored_by": "s", "set": A.SMALL_PREFERRED, "kind": "generated",
                   "model": model, "params": params * 1000, "step": 10 * (i + 1), "tokens": 0,
                   "flops": 1.0 + i, "valid_ppl": 100.0 / (i + 1), "nll": np.log(p), "ppl": p,
                   "num_tokens": 10, "num_sequences": 1})
  return pd.DataFrame(rows, columns=A.COLUMNS)


def test_fall_then_rise_answer_on_known_shapes():
  yes = {"s": [50, 20, 19, 19, 19.5], "m": [50, 18, 17, 20, 22], "l": [60, 15, 14, 25, 40]}
  ans = A.fall_then_rise_answer(A.shapes(_table(yes), A.SMALL_PREFERRED))
  assert ans.answer and ans.rising == ("m", "l") and ans.all_fall
  sh = A.shapes(_table(yes), A.SMALL_PREFERRED)[2]
  assert sh.min_step == 30 and sh.min_valid_ppl == pytest.approx(100 / 3)
  # 5 checkpoints: the first half is checkpoints 1-2, whose minimum is 14.
  assert sh.fall == pytest.approx(1 - 14 / 60) and sh.rise == pytest.approx(40 / 14 - 1)
  cases = {
      "small rises": {"s": [50, 20, 30, 40, 50], "l": [60, 15, 14, 25, 40]},
      "no rise": {"s": [50, 20, 19, 19, 19], "l": [60, 15, 14, 14, 14]},
      "late fall only": {"s": [50, 50, 50, 20, 19], "l": [60, 15, 14, 25, 40]},
      "middle size breaks": {"s": [50, 20, 19, 19, 19], "m": [50, 18, 17, 25, 40],
                             "l": [60, 15, 14, 13, 12]},
  }
  for name, curves in cases.items():
    ans = A.fall_then_rise_answer(A.shapes(_table(curves), A.SMALL_PREFERRED))
    assert not ans.answer, name
  ans = A.fall_then_rise_answer(A.shapes(_table(cases["middle size breaks"]), A.SMALL_PREFERRED))
  assert ans.pattern_breaks == ("l",) and "**No.**" in ans.text
