"""Suite manifests (opt_jax.suite) and the atomic result store (opt_jax.results)."""

import json
import os

import numpy as np
import pytest

from opt_jax import families, results, suite
from opt_jax.checkpoints import orbax_format

TINY = families.get("opt").config(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, ffn_dim=32, max_position_embeddings=32)


def _fake_checkpoint(directory, config=TINY):
  # Manifest validation reads config.json and opt_jax.json and checks that orbax's metadata file
  # is there (opt_jax.checkpoints.checkpoint.checkpoint_problem); it reads no arrays.
  os.makedirs(os.path.join(directory, "params"), exist_ok=True)
  families.write_config(config, os.path.join(directory, "config.json"))
  _write(os.path.join(directory, "opt_jax.json"), json.dumps({"format": orbax_format.FORMAT_VERSION}))
  _write(os.path.join(directory, "params", "_METADATA"), "{}")


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def test_manifest_resolves_paths_and_derives_tokens_and_flops(tmp_path):
  _fake_checkpoint(tmp_path / "ckpt" / "a" / "s2000")
  _fake_checkpoint(tmp_path / "abs" / "s4000")
  manifest = {"name": "toy", "models": [{
      "name": "opt-toy", "params": TINY.num_params(), "tokens_per_step": 500000,
      "aliases": ["facebook/opt-toy"],
      "checkpoints": {"4000": str(tmp_path / "abs" / "s4000"), "2000": "ckpt/a/s2000"}}]}
  path = _write(tmp_path / "suite.json", json.dumps(manifest))
  s = suite.load_suite(path)
  m = s.models[0]
  assert m.steps == [2000, 4000]                       # sorted, ints
  assert m.path(2000) == str(tmp_path / "ckpt" / "a" / "s2000")
  assert m.path(4000) == str(tmp_path / "abs" / "s4000")
  assert m.tokens(2000) == 1_000_000_000               # 2000 x 500k
  assert m.flops(4000) == 6 * TINY.num_params() * 2_000_000_000
  rows = s.rows()
  assert [r["step"] for r in rows] == [2000, 4000] and rows[1]["tokens"] == 2_000_000_000
  assert len(s) == 2
  assert s.source == path


def test_yaml_manifest_reads_like_json(tmp_path):
  _fake_checkpoint(tmp_path / "c1")
  text = f"""
name: toy
models:
  - name: opt-toy
    params: {TINY.num_params()}
    tokens_per_step: 1000
    checkpoints:
      10: c1
"""
  s = suite.load_suite(_write(tmp_path / "suite.yaml", text))
  assert s.models[0].checkpoints == {10: str(tmp_path / "c1")}
  assert s.models[0].tokens(10) == 10_000


def test_every_manifest_problem_is_listed_at_once(tmp_path):
  for step in (1, 2, 3):
    _fake_checkpoint(tmp_path / f"a{step}")
  _fake_checkpoint(tmp_path / "a4", TINY.replace(hidden_size=32))          # another shape
  _fake_checkpoint(tmp_path / "b1", TINY)
  os.makedirs(tmp_path / "not_a_checkpoint")
  # Written as text so the exact duplicate key "3" survives (json.load would keep one).
  text = """{"name": "toy", "owner": "me", "models": [
    {"name": "a", "params": %d, "tokens_per_step": 100, "aliases": ["shared"],
     "checkpoints": {"1": "a1", "2": "a2", "02": "a1", "3": "a3", "3": "a3", "4": "a4",
                     "5": "missing", "2.5": "a1", "six": "a1"},
     "colour": "red"},
    {"name": "b", "params": 999999999, "tokens_per_step": 100, "aliases": ["Shared"],
     "checkpoints": {"1": "b1", "2": "not_a_checkpoint"}},
    {"name": "c", "params": 10, "checkpoints": {"1": "a1"}}
  ]}""" % TINY.num_params()
  with pytest.raises(suite.SuiteError) as info:
    suite.load_suite(_write(tmp_path / "suite.json", text))
  problems = info.value.problems
  expected = [
      "unknown top-level field 'owner'",
      "models[0] (a): unknown field 'colour'",
      "models[0] (a): duplicate step 2 (keys '2' and '02')",
      "models[0] (a): duplicate step 3 (keys '3' and '3')",
      "models[0] (a): checkpoint step '2.5' is not a non-negative integer",
      "models[0] (a): checkpoint step 'six' is not a non-negative integer",
      "models[2] (c): missing 'tokens_per_step'",
      "alias 'Shared' of model 'b' is also used by model 'a'",
      f"model 'a' step 5: checkpoint directory {tmp_path / 'missing'} does not exist",
      "model 'a' step 4: config.json in",
      f"model 'b' step 2: {tmp_path / 'not_a_checkpoint' / 'config.json'} not found",
      "model 'b': manifest says params=999999999",
      "model 'c': manifest says params=10 but its checkpoints' config.json has 3824",
  ]
  for e in expected:
    assert any(e in p for p in problems), (e, problems)
  assert len(problems) == len(expected), problems
  differs = next(p for p in problems if "model 'a' step 4" in p)
  assert "hidden_size=32 (step 1: 16)" in differs
  assert str(tmp_path / "suite.json") in str(info.value)


def test_check_paths_false_accepts_missing_directories(tmp_path):
  text = json.dumps({"name": "x", "models": [{"name": "m", "params": 5, "tokens_per_step": 2,
                                               "checkpoints": {"7": "nowhere/step7"}}]})
  path = _write(tmp_path / "s.json", text)
  with pytest.raises(suite.SuiteError, match="does not exist"):
    suite.load_suite(path)
  s = suite.load_suite(path, check_paths=False)
  assert s.models[0].path(7) == str(tmp_path / "nowhere" / "step7")
  assert s.models[0].flops(7) == 6 * 5 * 14


def test_yaml_duplicate_steps_and_bad_syntax_are_reported(tmp_path):
  text = "name: t\nmodels:\n- name: m\n  params: 5\n  tokens_per_step: 2\n  checkpoints:\n" \
         "    10: a\n    10: b\n"
  with pytest.raises(suite.SuiteError, match="duplicate step 10"):
    suite.load_suite(_write(tmp_path / "s.yml", text), check_paths=False)
  with pytest.raises(suite.SuiteError, match="not valid JSON"):
    suite.load_suite(_write(tmp_path / "s.json", "{"), check_paths=False)
  with pytest.raises(FileNotFoundError, match="suite manifest not found"):
    suite.load_suite(tmp_path / "absent.json")


def test_find_model_by_name_or_alias(tmp_path):
  text = json.dumps({"name": "x", "models": [
      {"name": "opt-125m", "params": 5, "tokens_per_step": 2, "aliases": ["facebook/opt-125m"],
       "checkpoints": {"1": "a"}},
      {"name": "opt-1.3b", "params": 7, "tokens_per_step": 2, "checkpoints": {"1": "b"}}]})
  s = suite.load_suite(_write(tmp_path / "s.json", text), check_paths=False)
  assert suite.find_model(s, "facebook/OPT-125m").name == "opt-125m"
  assert s.model("opt-1.3b").params == 7
  with pytest.raises(KeyError, match="no model named 'opt-2.7b'.*opt-125m"):
    s.model("opt-2.7b")
  assert [m.name for m in s.select(["opt-1.3b"]).models] == ["opt-1.3b"]


def test_opt_template_follows_xia_et_al(tmp_path):
  path = suite.write_opt_template(tmp_path / "opt.json", root="/data/opt")
  s = suite.load_suite(path, check_paths=False)
  assert [m.name for m in s.models] == ["opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b",
                                        "opt-175b"]
  by = {m.name: m for m in s.models}
  # Figures typed from the sources named in opt_jax/suite.py (OPT Table 1; Xia et al. utils.py).
  assert by["opt-125m"].params == 125239296      # HF facebook/opt-125m parameter count
  assert {m.name: m.tokens_per_step for m in s.models} == {
      "opt-125m": 500_000, "opt-1.3b": 1_000_000, "opt-6.7b": 2_000_000, "opt-13b": 4_000_000,
      "opt-30b": 4_000_000, "opt-175b": 2_000_000}
  assert {m.name: (len(m.steps), m.steps[0], m.steps[-1]) for m in s.models} == {
      "opt-125m": (36, 2000, 560000), "opt-1.3b": (22, 2000, 260000),
      "opt-6.7b": (21, 2000, 140000), "opt-13b": (18, 2000, 70000),
      "opt-30b": (18, 2000, 70000), "opt-175b": (32, 4000, 140000)}
  assert 180000 not in by["opt-125m"].steps and 200000 in by["opt-125m"].steps
  assert not {28000, 32000, 116000} & set(by["opt-175b"].steps)
  assert by["opt-6.7b"].steps[9:12] == [38000, 40000, 50000]
  assert by["opt-13b"].path(70000) == "/data/opt/opt-13b/step70000"
  assert s.model("facebook/opt-30b").params == families.preset("opt-30b").num_params()
  # The template's default root is relative: it resolves against the manifest's folder.
  rel = suite.load_suite(suite.write_opt_template(tmp_path / "t.json", sizes=["125m"]),
                         check_paths=False)
  assert rel.models[0].path(2000) == str(tmp_path / "checkpoints" / "opt-125m" / "step2000")
  with pytest.raises(KeyError, match="2.7b"):
    suite.opt_suite_template(sizes=["2.7b"])


# Result store --------------------------------------------------------------------------------


def test_store_roundtrip_keys_and_prefix(tmp_path):
  store = results.ResultStore(tmp_path / "store", writer=True)
  key = ("ppl", "opt-125m", 2000)
  assert not store.has(key)
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert store.write(key, {"x": a, "ids": np.array([1, 2], np.int64)},
                     {"nll": np.float32(2.5), "n": np.int64(7), "corpora": ["a", "b"]})
  assert store.has(key) and key in store
  arrays, meta = store.read(key)
  np.testing.assert_array_equal(arrays["x"], a)
  assert arrays["x"].dtype == np.float32 and arrays["ids"].dtype == np.int64
  assert meta == {"nll": 2.5, "n": 7, "corpora": ["a", "b"]}
  store.write(("ppl", "opt-125m", 10), {}, {})
  store.write(("ppl", "opt/weird name", 10), {}, {})
  store.write(("other", "opt-125m", 10), {}, {})
  assert store.keys(("ppl", "opt-125m")) == [("ppl", "opt-125m", 10), key]   # numeric order
  assert store.keys(("ppl",)) == [("ppl", "opt-125m", 10), key, ("ppl", "opt/weird name", 10)]
  assert len(store.list()) == 4
  assert store.read_meta(key)["n"] == 7
  with pytest.raises(KeyError, match="no result for key"):
    store.read(("ppl", "opt-125m", 3))
  with pytest.raises(ValueError, match="reserved"):
    store.write(("k",), {"__meta__": np.zeros(1)})


def test_store_write_is_atomic(tmp_path, monkeypatch):
  store = results.ResultStore(tmp_path, writer=True)
  key = ("e", "m", 1)
  store.write(key, {"v": np.ones(3)}, {"version": 1})

  def crash(src, dst):
    raise OSError("disk full")
  monkeypatch.setattr(results.os, "replace", crash)
  with pytest.raises(OSError, match="disk full"):
    store.write(key, {"v": np.zeros(3)}, {"version": 2})
  monkeypatch.undo()
  # The old result is intact and the failed write left nothing behind.
  arrays, meta = store.read(key)
  assert meta["version"] == 1 and arrays["v"].tolist() == [1, 1, 1]
  assert sorted(os.listdir(os.path.dirname(store.path(key)))) == ["1.npz"]
  # A temporary file left by a killed writer is never taken for a result.
  _write(os.path.join(os.path.dirname(store.path(key)), ".2.npz.abc.tmp"), "partial")
  assert store.keys() == [key] and not store.has(("e", "m", 2))


def test_store_only_writer_writes(tmp_path):
  reader = results.ResultStore(tmp_path, writer=False)
  assert reader.write(("e", 1), {"v": np.ones(1)}) is False
  assert not reader.has(("e", 1)) and not os.listdir(tmp_path)
  # Default: the main process (opt_jax.sharding.is_main_process) writes; tests run as process 0.
  assert results.ResultStore(tmp_path).is_writer


def test_exclude_and_known_duplicates_round_trip(tmp_path):
  data = {"name": "t", "models": [{
      "name": "m", "params": 10, "tokens_per_step": 5, "known_duplicates": [[0, 1]],
      "exclude": {"2": "a copy of step 3"}, "checkpoints": {str(s): f"c{s}" for s in range(4)}}]}
  s = suite.parse_suite(data, str(tmp_path), check_paths=False)
  m = s.models[0]
  assert m.steps == [0, 1, 3] and m.excluded == {2: "a copy of step 3"}
  assert (m.duplicate_of(1), m.duplicate_of(0), m.duplicate_of(3)) == (0, None, None)
  s = s.exclude(["m@3"])
  assert s.models[0].steps == [0, 1] and s.excluded_lines() == [
      "m step 2 excluded: a copy of step 3", "m step 3 excluded: --exclude"]
  again = suite.parse_suite(s.to_dict(), str(tmp_path), check_paths=False).models[0]
  assert again.steps == [0, 1] and again.known_duplicates == ((0, 1),)
  assert sorted(again.excluded) == [2, 3]
  for bad in ({"exclude": {"9": "x"}}, {"known_duplicates": [[0]]}):
    with pytest.raises(suite.SuiteError):
      suite.parse_suite({**data, "models": [{**data["models"][0], **bad}]}, str(tmp_path),
                        check_paths=False)
  with pytest.raises(KeyError, match="expected MODEL@STEP"):
    s.exclude(["m3"])
