"""Integrity checks of a suite (opt_jax.integrity, tools/check_suite.py).

The checkpoints are tiny random HF OPT folders (safetensors, single and sharded), PyTorch .bin
shards and opt_jax orbax checkpoints, placed in a fake HF cache or in plain folders; each problem
is planted by hand and must be found, and a clean suite must pass.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import _hf_cache_util as u
from opt_jax import integrity, suite
from opt_jax.checkpoints import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Four tiny random HF OPT folders with different weights, and two sharded ones."""
  root = tmp_path_factory.mktemp("src")
  single = [u.tiny_opt(str(root / f"s{i}"), seed=i) for i in range(4)]
  sharded = [u.tiny_opt(str(root / f"sh{i}"), seed=10 + i, max_shard_size="12KB")
             for i in range(3)]
  return single, sharded


def _suite(tmp_path, checkpoints, tokens_per_step=1000, name="m"):
  """A loaded one-model suite; checkpoints: step -> path or {"path", "revision", "sha"}."""
  manifest = {"name": "t", "models": [{"name": name, "params": 6048,
                                       "tokens_per_step": tokens_per_step,
                                       "checkpoints": {str(s): c for s, c in checkpoints.items()}}]}
  path = tmp_path / "suite.json"
  path.write_text(json.dumps(manifest))
  return suite.load_suite(path, check_paths=False)


def _cached(cache, repo, revision, source):
  snap = u.add_revision(cache, repo, revision, source)
  return {"path": snap, "revision": revision, "sha": os.path.basename(snap)}


def _by_step(report):
  return {r.step: r for r in report.rows}


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _tensor_offset(path, name):
  header = safetensors_io.read_header(path)
  dtype, shape, begin, end = header.tensors[name]
  return header.data_start + begin, header.data_start + end


def test_integrity_and_hf_cache_do_not_import_jax():
  code = ("import sys, opt_jax.integrity, opt_jax.hf_cache, opt_jax.suite_templates, "
          "opt_jax.suite; assert 'jax' not in sys.modules, sorted(sys.modules)")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
  assert res.returncode == 0, res.stderr


def test_clean_suite_passes_and_check_suite_exits_0(tmp_path, sources):
  single, sharded = sources
  cache = str(tmp_path / "hub")
  ckpts = {s: _cached(cache, "org/m", f"step{s}", single[i]) for i, s in enumerate((0, 10, 20))}
  ckpts[30] = _cached(cache, "org/m", "step30", sharded[0])
  s = _suite(tmp_path, ckpts)
  for deep in (False, True):
    report = integrity.check_suite(s, deep=deep)
    assert report.ok, report.problems
    assert [r.status for r in report.rows] == ["ok"] * 4
  res = subprocess.run([sys.executable, "-m", "tools.check_suite", f"--suite={s.source}",
                        f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
  assert res.returncode == 0, res.stdout + res.stderr
  lines = (tmp_path / "out" / "t_integrity.csv").read_text().splitlines()
  assert lines[0] == ",".join(integrity.CSV_COLUMNS) and len(lines) == 5
  assert lines[2].startswith(f"m,10,step10,{ckpts[10]['sha']},ok,,")


def test_duplicates_are_found_fast_and_deep(tmp_path, sources):
  single, _ = sources
  cache = str(tmp_path / "hub")
  s = _suite(tmp_path, {
      0: _cached(cache, "org/m", "step0", single[0]),
      1: _cached(cache, "org/m", "step1", single[0]),       # pythia#83: step1 serves step0
      2: _cached(cache, "org/m", "step2", single[1]),
      3: _copy(single[1], tmp_path / "copy_of_step2"),      # same bytes, other files
      4: _cached(cache, "org/m", "step4", single[2])})
  for deep in (False, True):
    rows = _by_step(integrity.check_suite(s, deep=deep))
    assert {k: (r.status, r.duplicate_of) for k, r in rows.items()} == {
        0: ("duplicate", 1), 1: ("duplicate", 0), 2: ("duplicate", 3), 3: ("duplicate", 2),
        4: ("ok", None)}
    assert "weights identical to step 0" in rows[1].problems[0]
    # Steps 0 and 1 are one blob: identical bytes even in the fast mode; 2 and 3 only sampled.
    assert "sampled bytes" not in rows[1].problems[0]
    assert ("sampled bytes" in rows[3].problems[0]) == (not deep)
  res = subprocess.run([sys.executable, "-m", "tools.check_suite", f"--suite={s.source}",
                        "--deep"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
  assert res.returncode == 1 and "problem: m step 1: weights identical to step 0" in res.stdout
  assert os.path.isfile(tmp_path / "t_integrity.csv")      # default --out: the manifest's folder


def test_deep_mode_sees_a_change_the_fast_sample_misses(tmp_path, sources, monkeypatch):
  single, _ = sources
  changed = _copy(single[0], tmp_path / "changed")
  path = os.path.join(changed, "model.safetensors")
  begin, end = _tensor_offset(path, "model.decoder.embed_tokens.weight")   # 64 x 16 float32
  with open(path, "r+b") as f:                                             # one byte mid-tensor
    f.seek((begin + end) // 2)
    byte = f.read(1)
    f.seek((begin + end) // 2)
    f.write(bytes([byte[0] ^ 0xFF]))
  s = _suite(tmp_path, {0: single[0], 1: changed})
  monkeypatch.setattr(integrity, "FAST_WINDOWS", 2)       # windows: first and last 64 bytes
  monkeypatch.setattr(integrity, "WINDOW_BYTES", 64)
  fast = _by_step(integrity.check_suite(s))
  deep = _by_step(integrity.check_suite(s, deep=True))
  assert fast[1].status == "duplicate" and "sampled" in fast[1].problems[0]
  assert deep[1].status == "partial_duplicate"
  assert deep[1].problems == ["35 of 36 tensors or weight files identical to step 0's, e.g. "
                              "model.decoder.embed_positions.weight"]


def test_a_stale_shard_is_a_partial_duplicate(tmp_path, sources):
  # pythia#206: two pythia-12b steps serve the final checkpoint's first shard.
  _, sharded = sources
  shards = sorted(n for n in os.listdir(sharded[0]) if n.startswith("model-"))
  stale = _copy(sharded[2], tmp_path / "stale")
  shutil.copyfile(os.path.join(sharded[0], shards[0]), os.path.join(stale, shards[0]))
  cache = str(tmp_path / "hub")
  s = _suite(tmp_path, {1000: _cached(cache, "org/m", "step1000", stale),
                        143000: _cached(cache, "org/m", "step143000", sharded[0]),
                        2000: _cached(cache, "org/m", "step2000", sharded[1])})
  rows = _by_step(integrity.check_suite(s))
  with open(os.path.join(sharded[0], "model.safetensors.index.json")) as f:
    in_first = sum(v == shards[0] for v in json.load(f)["weight_map"].values())
  assert rows[1000].status == "partial_duplicate" and rows[1000].duplicate_of == 143000
  assert rows[1000].problems[0].startswith(f"{in_first} of 36 tensors or weight files identical "
                                           "to step 143000's")
  assert rows[143000].status == "partial_duplicate" and rows[143000].duplicate_of == 1000
  assert rows[2000].status == "ok"


def test_bin_shards_are_compared_by_their_blob_sha256(tmp_path, monkeypatch):
  import torch  # pylint: disable=import-outside-toplevel

  def bin_dir(name, parts):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    weight_map = {}
    for i, seed in enumerate(parts, 1):
      shard = f"pytorch_model-0000{i}-of-0000{len(parts)}.bin"
      torch.manual_seed(seed)
      torch.save({f"w{i}": torch.randn(64, 64)}, d / shard)
      weight_map[f"w{i}"] = shard
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(d)

  cache = str(tmp_path / "hub")
  a = _cached(cache, "org/m", "step100", bin_dir("a", [1, 2]))
  ckpts = {100: a, 200: _cached(cache, "org/m", "step200", bin_dir("b", [1, 3])),
           300: _cached(cache, "org/m", "step300", bin_dir("c", [4, 5])),
           400: _cached(cache, "org/m", "step400", bin_dir("d", [1, 2]))}
  truncated = bin_dir("e", [6, 7])
  with open(os.path.join(truncated, "pytorch_model-00002-of-00002.bin"), "r+b") as f:
    f.truncate(1000)
  ckpts[500] = truncated
  rows = _by_step(integrity.check_suite(_suite(tmp_path, ckpts)))
  assert rows[100].status == rows[400].status == "duplicate"
  assert "sampled" not in rows[400].problems[0]          # blob names are exact sha256s
  assert rows[200].status == "partial_duplicate" and "pytorch_model-00001-of-00002.bin" in \
      rows[200].problems[0]
  assert rows[300].status == "bin_only" and not rows[300].problems
  assert rows[300].note == integrity.BIN_ONLY_NOTE
  assert rows[500].status == "unreadable" and "zip" in rows[500].problems[0]
  # --deep also checks that each blob's bytes have the sha256 it is named by.
  blob = os.path.realpath(os.path.join(a["path"], "pytorch_model-00002-of-00002.bin"))
  with open(blob, "r+b") as f:
    f.seek(100)
    f.write(b"\0" * 4)
  # The fast check verifies small blobs (all of these) too; past FAST_VERIFY_BYTES only --deep.
  fast = _by_step(integrity.check_suite(_suite(tmp_path, ckpts)))
  assert fast[100].status == "unreadable" and "does not match its blob name" in \
      fast[100].problems[0]
  monkeypatch.setattr(integrity, "FAST_VERIFY_BYTES", 0)
  assert _by_step(integrity.check_suite(_suite(tmp_path, ckpts)))[100].status == "duplicate"
  deep = _by_step(integrity.check_suite(_suite(tmp_path, ckpts), deep=True))
  assert deep[100].status == deep[400].status == "unreadable"   # one blob, both revisions
  assert "does not match its blob name" in deep[400].problems[0]


def test_unreadable_and_truncated_files_are_found(tmp_path, sources):
  single, sharded = sources
  truncated = _copy(single[0], tmp_path / "truncated")
  with open(os.path.join(truncated, "model.safetensors"), "r+b") as f:
    f.truncate(os.path.getsize(f.name) - 100)
  garbage = _copy(single[1], tmp_path / "garbage")
  with open(os.path.join(garbage, "model.safetensors"), "r+b") as f:
    f.write(b"\xff" * 8)
  lost_shard = _copy(sharded[0], tmp_path / "lost_shard")
  shards = sorted(n for n in os.listdir(lost_shard) if n.startswith("model-"))
  os.remove(os.path.join(lost_shard, shards[-1]))
  no_weights = _copy(single[2], tmp_path / "no_weights")
  os.remove(os.path.join(no_weights, "model.safetensors"))
  cache = str(tmp_path / "hub")
  corrupt = _cached(cache, "org/m", "step50", single[3])   # blob bytes changed, size kept
  blob = os.path.realpath(os.path.join(corrupt["path"], "model.safetensors"))
  with open(blob, "r+b") as f:
    f.seek(-4, os.SEEK_END)
    f.write(b"\0\0\0\0")
  s = _suite(tmp_path, {10: truncated, 20: garbage, 30: lost_shard, 40: no_weights, 50: corrupt,
                        60: str(tmp_path / "nowhere")})
  rows = _by_step(integrity.check_suite(s, deep=True))
  assert all(rows[k].status == "unreadable" for k in (10, 20, 30, 40, 50, 60)), rows
  size = os.path.getsize(os.path.join(truncated, "model.safetensors"))
  assert f"truncated: the header promises {size + 100} bytes, the file has {size}" in \
      rows[10].problems[0]
  assert "not a readable safetensors file" in rows[20].problems[0]
  assert f"lists shard {shards[-1]}, which is missing" in rows[30].problems[0]
  assert "no weights" in rows[40].problems[0]
  assert "does not match its blob name" in rows[50].problems[0]
  assert "no such directory" in rows[60].problems[0]
  # The fast mode reads whole blobs only up to FAST_VERIFY_BYTES: past that it cannot see the
  # changed blob.
  assert _by_step(integrity.check_suite(s))[50].status == "unreadable"
  integrity.FAST_VERIFY_BYTES, before = 0, integrity.FAST_VERIFY_BYTES
  try:
    assert _by_step(integrity.check_suite(s))[50].status == "ok"
  finally:
    integrity.FAST_VERIFY_BYTES = before


def test_config_difference_is_found_and_ignored_fields_are_not(tmp_path, sources):
  single, _ = sources

  def edit(src, name, **changes):
    d = _copy(src, tmp_path / name)
    path = os.path.join(d, "config.json")
    with open(path) as f:
      config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
      json.dump(config, f)
    return d

  s = _suite(tmp_path, {
      1: single[0], 2: edit(single[1], "bookkeeping", transformers_version="4.0.0",
                            torch_dtype="float16", _name_or_path="x", dropout=0.3),
      3: edit(single[2], "relu_to_gelu", activation_function="gelu"), 4: single[3]})
  rows = _by_step(integrity.check_suite(s))
  assert [rows[k].status for k in (1, 2, 4)] == ["ok"] * 3
  assert rows[3].status == "config_differs"
  assert rows[3].problems == ["config.json differs from the model's other checkpoints: "
                              "activation_function='gelu' (step 1: 'relu')"]


def test_layout_difference_is_found(tmp_path, sources):
  single, _ = sources
  wider = u.tiny_opt(str(tmp_path / "wider"), seed=3, ffn_dim=48)
  rows = _by_step(integrity.check_suite(_suite(tmp_path, {1: single[0], 2: single[1],
                                                          3: wider})))
  assert rows[3].status == "config_differs"            # the config says so too
  assert "ffn_dim=48 (step 1: 32)" in rows[3].problems[0]
  assert rows[3].problems[1].startswith(
      "tensors differ from the model's other checkpoints: model.decoder.layers.0.fc1.bias is F32 "
      "[48] (step 1: F32 [32]); model.decoder.layers.0.fc1.weight is F32 [48, 16] (step 1: F32 "
      "[32, 16]) and 4 more")


def test_a_checkpoint_stored_in_another_dtype_is_found(tmp_path, sources):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  single, _ = sources
  half = str(tmp_path / "half")
  transformers.OPTForCausalLM.from_pretrained(single[2]).to(torch.float16).save_pretrained(half)
  rows = _by_step(integrity.check_suite(_suite(tmp_path, {1: single[0], 2: single[1],
                                                          3: half})))
  assert rows[3].status == "layout_differs"   # torch_dtype in config.json is ignored, not this
  assert "model.decoder.embed_positions.weight is F16 [34, 16] (step 1: F32 [34, 16])" in \
      rows[3].problems[0]


def test_step_order_problems_are_found(tmp_path, sources):
  single, _ = sources
  cache = str(tmp_path / "hub")
  s = _suite(tmp_path, {
      1000: _cached(cache, "org/m", "step1000-tokens5B", single[0]),
      2000: _cached(cache, "org/m", "step2000-tokens3B", single[1]),       # fewer tokens
      3000: _cached(cache, "org/m", "step4000-tokens17B", single[2]),      # another step
      5000: _cached(cache, "org/m", "step5000-tokens21B", single[3])}, tokens_per_step=4_194_304)
  rows = _by_step(integrity.check_suite(s))
  assert [rows[k].status for k in (1000, 2000, 3000, 5000)] == [
      "ok", "out_of_order", "out_of_order", "ok"]
  assert rows[2000].problems == [
      "revision step2000-tokens3B names 3B tokens but step 2000 x tokens_per_step 4194304 = 8.4B",
      "revision step2000-tokens3B names fewer tokens (3B) than step 1000 (5B)"]
  assert rows[3000].problems == ["revision step4000-tokens17B names step 4000, the manifest says "
                                 "step 3000"]


def test_orbax_checkpoints_are_hashed_and_a_missing_chunk_is_found(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from _suite_util import random_params  # pylint: disable=import-outside-toplevel
  from opt_jax.checkpoints import orbax_format  # pylint: disable=import-outside-toplevel
  from opt_jax import families  # pylint: disable=import-outside-toplevel
  config = families.get("opt").config(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, ffn_dim=32,
                                      max_position_embeddings=32)
  paths = {}
  for step, seed in ((1, 1), (2, 2), (3, 3)):
    paths[step] = str(tmp_path / f"ck{step}")
    orbax_format.save(paths[step], random_params(config, seed=seed), config)
  paths[4] = _copy(paths[2], tmp_path / "copy_of_2")
  params = os.path.join(paths[3], "params")
  chunk = os.path.join(params, "embed.embedding", "0.0")
  os.remove(chunk)
  short = os.path.join(params, "layers.mlp.up_kernel", "0.0.0")
  with open(short, "r+b") as f:
    f.truncate(10)
  for deep in (False, True):
    rows = _by_step(integrity.check_suite(_suite(tmp_path, paths), deep=deep))
    assert (rows[1].status, rows[2].status, rows[4].duplicate_of) == ("ok", "duplicate", 2)
    assert rows[3].status == "unreadable"
    assert rows[3].problems[:2] == [
        f"{os.path.dirname(chunk)}: chunk 0.0 is missing",
        f"{short}: 10 bytes, expected {2 * 16 * 32 * np.dtype('f4').itemsize}: truncated or "
        "corrupt"]


def test_second_fast_check_reads_no_tensor_bytes_and_deep_rereads_all(tmp_path, sources,
                                                                     monkeypatch):
  single, sharded = sources
  monkeypatch.setattr(integrity, "FAST_VERIFY_BYTES", 0)   # the fast mode samples every blob
  cache = str(tmp_path / "hub")
  plain = _copy(single[1], tmp_path / "plain")
  s = _suite(tmp_path, {0: _cached(cache, "org/m", "step0", single[0]), 1: plain,
                        2: _cached(cache, "org/m", "step2", sharded[0])})
  reads = []
  real_read = integrity._read
  monkeypatch.setattr(integrity, "_read", lambda f, o, n: reads.append(n) or real_read(f, o, n))
  out = str(tmp_path / "out")
  read_bytes = []
  for deep in (False, True):
    reads.clear()
    first = integrity.check_suite(s, deep=deep, cache_dir=out).records()
    read_bytes.append(sum(reads))
    reads.clear()
    assert integrity.check_suite(s, deep=deep, cache_dir=out).records() == first
    # fast: nothing read again; deep: every byte read again (a cache never answers for it).
    assert sum(reads) == (read_bytes[-1] if deep else 0)
  # Tiny tensors are read whole in both modes; deep also reads headers for the file sha256.
  assert 0 < read_bytes[0] < read_bytes[1]
  # A blob corrupted in place after a deep check (same name, size and mtime) is caught by the
  # next deep check.
  blob = os.path.realpath(os.path.join(s.models[0].path(0), "model.safetensors"))
  st = os.stat(blob)
  with open(blob, "r+b") as f:
    f.seek(st.st_size - 3)
    byte = f.read(1)
    f.seek(st.st_size - 3)
    f.write(bytes([byte[0] ^ 0xFF]))
  os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
  deep = _by_step(integrity.check_suite(s, deep=True, cache_dir=out))
  assert deep[0].status == "unreadable" and "does not match its blob name" in deep[0].problems[0]
  # A changed file (new mtime) is hashed again; the others come from the cache.
  path = os.path.join(plain, "model.safetensors")
  os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
  reads.clear()
  integrity.check_suite(s, cache_dir=out)
  assert 0 < len(reads) <= 36 * integrity.FAST_WINDOWS


# The experiments' pre-check -------------------------------------------------------------------


def test_experiment_sweep_leaves_out_a_duplicate_or_stops_when_strict(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel

  import _suite_util  # pylint: disable=import-outside-toplevel
  from experiments import context  # pylint: disable=import-outside-toplevel
  from opt_jax.errors import InputError  # pylint: disable=import-outside-toplevel

  path = _suite_util.make_suite(str(tmp_path / "s"), {"tiny-a": _suite_util.SIZES["tiny-a"]},
                                steps=(10, 20, 30))
  root = os.path.dirname(path)
  # Step 20 serves step 10's weights (a copy: other files, same bytes).
  shutil.rmtree(os.path.join(root, "ckpt/tiny-a/step20"))
  shutil.copytree(os.path.join(root, "ckpt/tiny-a/step10"),
                  os.path.join(root, "ckpt/tiny-a/step20"))
  seen = []

  def evaluate(model, step, config, params):
    seen.append(step)
    return {"x": np.zeros(1)}, {}

  out = tmp_path / "out"
  strict = context.ExperimentSettings(suite=path, out=str(out), strict_integrity=True)
  ctx = context.Experiment("t", strict, progress=False)
  with pytest.raises(InputError) as e:
    ctx.sweep(evaluate, ctx.key())
  msg = str(e.value)
  # The pair is named once, on its later step.
  assert msg.startswith("suite tiny: the integrity check found 1 problem(s) (--strict_integrity); "
                        "nothing was evaluated:\n  tiny-a step 20: weights identical to step 10")
  assert "step 10: weights identical" not in msg and seen == []
  # The hash cache lives under --out: a second check reads no tensor bytes of unchanged files.
  cache = out / context.INTEGRITY_DIR / integrity.CACHE_FILE
  hashed = cache.read_text()
  assert hashed.count("/step10/") == hashed.count("/step30/") > 0
  # By default the duplicate pair is left out, the rest evaluated, and the summary says so.
  ctx = context.Experiment("t", context.ExperimentSettings(suite=path, out=str(out)),
                           progress=False)
  report = ctx.sweep(evaluate, ctx.key())
  assert seen == [30] and len(report.evaluated) == 1
  assert cache.read_text() == hashed
  text = ctx.outcome(None).summary.render()
  assert ("tiny-a step 20 left out by the integrity check: weights identical to step 10"
          in text)
  assert "tiny-a step 10 left out by the integrity check: step 20 holds the same weights" in text
  seen.clear()
  # Known duplicates are evaluated, and marked in the CSVs and the summary.
  with open(path) as f:
    manifest = json.load(f)
  manifest["models"][0]["known_duplicates"] = [[10, 20]]
  with open(path, "w") as f:
    json.dump(manifest, f)
  ctx = context.Experiment("t", context.ExperimentSettings(suite=path, out=str(out / "k")),
                           progress=False)
  report = ctx.sweep(evaluate, ctx.key())
  assert seen == [10, 20, 30] and len(report.evaluated) == 3
  assert "known duplicates evaluated (column duplicate_of in the CSVs): tiny-a step 20 = step " \
         "10" in ctx.outcome(None).summary.render()
  import pandas as pd  # pylint: disable=import-outside-toplevel
  table = pd.read_csv(ctx.write_csv("t.csv", pd.DataFrame({"model": ["tiny-a"] * 3,
                                                           "step": [10, 20, 30]})))
  assert table["duplicate_of"].fillna(-1).tolist() == [-1, 10, -1]
  seen.clear()
  # --exclude leaves a checkpoint out without turning the other checks off.
  ctx = context.Experiment("t", context.ExperimentSettings(suite=path, out=str(out / "x"),
                                                           exclude=("tiny-a@30",)),
                           progress=False)
  ctx.sweep(evaluate, ctx.key())
  assert seen == [10, 20]
  assert "tiny-a step 30 excluded: --exclude" in ctx.outcome(None).summary.render()
  seen.clear()
  # --models restricts the pre-checks: another model's unreadable checkpoints are not looked at.
  manifest["models"].append({"name": "gone", "params": 1000, "tokens_per_step": 1,
                             "checkpoints": {"10": "nowhere/step10"}})
  with open(path, "w") as f:
    json.dump(manifest, f)
  _, lines = context._load_suite(path, ["tiny-a"])  # pylint: disable=protected-access
  assert lines == []
  _, lines = context._load_suite(path, None)  # pylint: disable=protected-access
  assert len(lines) == 1 and lines[0].startswith("gone step 10 left out: ") and \
      "does not exist" in lines[0]

  ctx = context.Experiment("t", context.ExperimentSettings(suite=path, out=str(out / "skip"),
                                                           skip_integrity_check=True),
                           progress=False)
  report = ctx.sweep(evaluate, ctx.key())
  assert seen == [10, 20, 30] and len(report.evaluated) == 3


def test_an_opt_jax_checkpoint_among_hf_siblings_is_no_layout_or_config_difference(tmp_path,
                                                                                    sources):
  from opt_jax import convert  # pylint: disable=import-outside-toplevel
  single, _ = sources
  converted = convert.convert(single[2], tmp_path / "opt_jax")   # tensor names of its own
  rows = _by_step(integrity.check_suite(_suite(tmp_path, {1: single[0], 2: converted,
                                                          3: single[1]})))
  assert all(r.status == "ok" and not r.problems for r in rows.values()), rows
  # A real difference of architecture is still found across formats.
  config = json.loads((tmp_path / "opt_jax" / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (tmp_path / "opt_jax" / "config.json").write_text(json.dumps(config))
  rows = _by_step(integrity.check_suite(_suite(tmp_path, {1: single[0], 2: converted,
                                                          3: single[1]})))
  assert rows[2].status == "config_differs" and "num_hidden_layers=3" in rows[2].problems[0]
