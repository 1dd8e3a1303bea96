"""Storage and sweep reliability: never delete what opt_jax did not write, never reuse a stale
result, never lose a sweep to one bad file, clean up after kill -9, honour the umask."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from jax.sharding import AbstractMesh

import _suite_util as U
from opt_jax import convert, errors, files, results, sharding, suite, sweep
from opt_jax.checkpoints import checkpoint, orbax_format

CONFIG = U.SIZES["tiny-a"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (1, 2, 3)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """Three opt_jax checkpoints of one tiny size (different random weights): step -> directory.
  Tests that change a checkpoint copy it first."""
  root = tmp_path_factory.mktemp("ckpts")
  out = {}
  for step in STEPS:
    out[step] = str(root / f"step{step}")
    orbax_format.save(out[step], U.random_params(CONFIG, seed=step), CONFIG)
  return out


def _suite(tmp_path, paths: dict[int, str], name="suite.json"):
  manifest = {"name": "t", "models": [{"name": "m", "params": CONFIG.num_params(),
                                       "tokens_per_step": 1,
                                       "checkpoints": {str(s): p for s, p in paths.items()}}]}
  path = tmp_path / name
  path.write_text(json.dumps(manifest))
  return suite.load_suite(path)


def _summary(model, step, config, params):
  return U.param_summary(params), {}


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _tree(root):
  """Every path under `root` with the bytes of its files (to show nothing was touched)."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      p = os.path.join(dirpath, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


# 1. Overwrite deletes only an earlier output of the same kind ---------------------------------

def test_overwrite_refuses_a_folder_holding_the_input_or_anything_else(ckpts, tmp_path,
                                                                       monkeypatch):
  root = tmp_path / "ckpts"
  opt_a = _copy(ckpts[1], root / "opt-a")
  _copy(ckpts[2], root / "opt-b")
  (root / "NOTES").write_text("my notes")
  before = _tree(root)

  def must_not_read(*args, **kwargs):
    raise AssertionError("the input was read before the output was checked")
  monkeypatch.setattr(checkpoint, "restore", must_not_read)
  for to in ("opt_jax", "hf"):
    with pytest.raises(errors.OutputExistsError, match=f"refusing to write: --output={root} "
                                                       f"holds the input --input={opt_a}"):
      convert.convert(opt_a, root, output_format=to, overwrite=True)
  # A folder that merely holds other things (not the input) is refused too.
  other = tmp_path / "other"
  _copy(ckpts[2], other / "opt-b")
  (other / "NOTES").write_text("keep")
  with pytest.raises(errors.OutputExistsError, match=r"it is not an opt_jax checkpoint \(it "
                                                     r"lacks config.json, opt_jax.json, params\)"):
    convert.convert(opt_a, other, overwrite=True)
  monkeypatch.undo()
  with pytest.raises(errors.OutputExistsError, match="refusing to overwrite"):
    orbax_format.save(root, U.random_params(CONFIG, seed=9), CONFIG, overwrite=True)
  assert _tree(root) == before
  assert (other / "NOTES").read_text() == "keep" and checkpoint.is_checkpoint(other / "opt-b")


def test_overwrite_replaces_an_earlier_output_of_the_same_kind_only(ckpts, tmp_path):
  out, out_hf = tmp_path / "out", tmp_path / "out-hf"
  convert.convert(ckpts[1], out)
  convert.convert(ckpts[2], out, overwrite=True)          # an earlier opt_jax output: replaced
  np.testing.assert_array_equal(U.param_summary(checkpoint.restore(out))["sums"],
                                U.param_summary(checkpoint.restore(ckpts[2]))["sums"])
  convert.convert(ckpts[1], out_hf, output_format="hf")
  convert.convert(ckpts[2], out_hf, output_format="hf", overwrite=True)
  assert sorted(os.listdir(out_hf)) == ["config.json", "model.safetensors"]
  # Not of the kind being written: refused, untouched.
  with pytest.raises(errors.OutputExistsError, match=r"it is not an HF safetensors checkpoint "
                                                     r"as opt_jax writes it \(it lacks "
                                                     r"model.safetensors\)"):
    convert.convert(ckpts[1], out, output_format="hf", overwrite=True)
  with pytest.raises(errors.OutputExistsError, match="it is not an opt_jax checkpoint"):
    convert.convert(ckpts[1], out_hf, overwrite=True)
  # An earlier output with something added by hand: refused, naming what is in the way.
  (out / "README.md").write_text("notes")
  with pytest.raises(errors.OutputExistsError, match=r"it holds README.md besides the files of "
                                                     r"an opt_jax checkpoint"):
    convert.convert(ckpts[1], out, overwrite=True)
  assert checkpoint.is_checkpoint(out) and (out / "README.md").read_text() == "notes"
  assert sorted(os.listdir(tmp_path)) == ["out", "out-hf"]       # no temporaries left


# 10. Clear one-line errors for damaged checkpoints and the wrong --format ---------------------

@pytest.mark.parametrize("damage, words", [
    ("missing chunk", "chunk file params/layers.mlp.up_kernel/0.0.0 is missing"),
    ("truncated chunk", "chunk file params/layers.mlp.up_kernel/0.0.0 has 100 bytes, expected 16384"),
    ("missing tensor", "tensor layers/mlp/up_kernel is missing (params/layers.mlp.up_kernel/.zarray"),
])
def test_damaged_checkpoint_is_one_line_naming_checkpoint_and_tensor(ckpts, tmp_path, damage,
                                                                     words, capfd):
  bad = _copy(ckpts[1], tmp_path / "bad")
  tensor = os.path.join(bad, "params", "layers.mlp.up_kernel")
  if damage == "missing chunk":
    os.remove(os.path.join(tensor, "0.0.0"))
  elif damage == "truncated chunk":
    os.truncate(os.path.join(tensor, "0.0.0"), 100)
  else:
    shutil.rmtree(tensor)
  capfd.readouterr()
  with pytest.raises(errors.InputError) as e:
    checkpoint.restore(bad)
  message = str(e.value)
  assert message.startswith(f"{bad}: ") and words in message and "layers/mlp/up_kernel" in message
  assert "\n" not in message
  assert capfd.readouterr().err == ""                      # no asyncio / orbax noise either


def test_format_opt_jax_on_an_hf_folder_says_which_format_it_is(ckpts, tmp_path):
  hf_dir = tmp_path / "hf"
  convert.convert(ckpts[1], hf_dir, output_format="hf")
  with pytest.raises(errors.InputError) as e:
    convert.convert(hf_dir, tmp_path / "out", input_format="opt_jax")
  assert str(e.value) == (f"{hf_dir} is not an opt_jax checkpoint: it holds hf weights; convert "
                          "it with input format 'hf' or 'auto' (--format=hf or --format=auto)")
  assert not os.path.exists(tmp_path / "out")


# 5. A sweep survives one bad file --------------------------------------------------------------

def test_sweep_records_a_bad_checkpoint_and_goes_on(ckpts, tmp_path, caplog):
  bad = _copy(ckpts[2], tmp_path / "bad")
  os.remove(os.path.join(bad, "params", "layers.mlp.down_kernel", "0.0.0"))
  s = _suite(tmp_path, {1: ckpts[1], 2: bad, 3: ckpts[3]})
  store = results.ResultStore(tmp_path / "store")

  def evaluate(model, step, config, params):
    if step == 3:
      raise RuntimeError("evaluation blew up\nsecond line")
    return _summary(model, step, config, params)
  with caplog.at_level(logging.ERROR, logger="opt_jax.sweep"):
    report = sweep.run_sweep(s, evaluate, store, progress=False)
  assert report.evaluated == [("eval", "m", 1)]
  assert report.failed == {
      ("eval", "m", 2): f"restoring {bad} failed: tensor layers/mlp/down_kernel: chunk file "
                        "params/layers.mlp.down_kernel/0.0.0 is missing; the checkpoint is damaged "
                        "or incomplete: convert or save it again",
      ("eval", "m", 3): f"evaluating {ckpts[3]} failed: RuntimeError: evaluation blew up"}
  errors_logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
  assert len(errors_logged) == 2 and all("\n" not in m for m in errors_logged)
  assert bad in errors_logged[0]
  with open(report.run_manifest) as f:
    manifest = json.load(f)
  assert manifest["status"] == "finished_with_failures"
  assert manifest["failed"] == {"eval/m/2": report.failed[("eval", "m", 2)],
                                "eval/m/3": report.failed[("eval", "m", 3)]}
  assert store.keys() == [("eval", "m", 1)]

  # stop_on_failure: the first failure ends the sweep with that error; later ones never run.
  seen = []

  def spy(model, step, config, params):
    seen.append(step)
    return _summary(model, step, config, params)
  store2 = results.ResultStore(tmp_path / "store2")
  with pytest.raises(errors.InputError, match="tensor layers/mlp/down_kernel"):
    sweep.run_sweep(s, spy, store2, progress=False, stop_on_failure=True)
  assert seen == [1] and store2.keys() == [("eval", "m", 1)]
  manifest = json.loads(open(os.path.join(store2.root, "runs",
                                          os.listdir(os.path.join(store2.root, "runs"))[0])).read())
  assert manifest["status"] == "stopped" and list(manifest["failed"]) == ["eval/m/2"]


def test_corrupt_stored_result_is_named_moved_aside_and_recomputed(ckpts, tmp_path, caplog):
  s = _suite(tmp_path, {1: ckpts[1], 2: ckpts[2]})
  store = results.ResultStore(tmp_path / "store")
  sweep.run_sweep(s, _summary, store, progress=False)
  path = store.path(("eval", "m", 2))
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 not really a zip")
  with pytest.raises(results.CorruptResultError, match=f"{path}: not a readable result"):
    store.read(("eval", "m", 2))
  evaluated = []

  def evaluate(model, step, config, params):
    evaluated.append(step)
    return _summary(model, step, config, params)
  with caplog.at_level(logging.WARNING, logger="opt_jax.sweep"):
    report = sweep.run_sweep(s, evaluate, store, progress=False)
  assert evaluated == [2] and report.recomputed == [("eval", "m", 2)]
  aside = [n for n in os.listdir(os.path.dirname(path)) if n.startswith("2.npz.corrupt-")]
  assert len(aside) == 1
  with open(os.path.join(os.path.dirname(path), aside[0]), "rb") as f:
    assert f.read() == b"PK\x03\x04 not really a zip"          # kept for inspection
  assert any(path in r.getMessage() and aside[0] in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(store.read(("eval", "m", 2))[0]["sums"],
                                U.param_summary(checkpoint.restore(ckpts[2]))["sums"])
  assert store.keys() == [("eval", "m", 1), ("eval", "m", 2)]


def test_load_suite_takes_an_hf_folder_and_rejects_a_bin_only_one_up_front(ckpts, tmp_path):
  hf_dir = tmp_path / "hf"
  convert.convert(ckpts[1], hf_dir, output_format="hf")
  s = _suite(tmp_path, {1: ckpts[1], 2: str(hf_dir)})
  assert s.model("m").path(2) == str(hf_dir)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shutil.copy(hf_dir / "config.json", bin_dir)
  (bin_dir / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(suite.SuiteError) as e:
    _suite(tmp_path, {1: ckpts[1], 2: str(bin_dir)})
  assert e.value.problems == [
      f"model 'm' step 2: {bin_dir} holds PyTorch .bin weights, which opt_jax reads only to "
      f"convert them: run python -m tools.convert_checkpoint --input={bin_dir} --output=DIR and "
      "use DIR"]


# 2. / 3. A stored result holds only for the checkpoint identity and dtype it was computed from -

def test_result_of_a_changed_checkpoint_path_or_dtype_is_stale_and_recomputed(ckpts, tmp_path,
                                                                              caplog):
  ckpt = _copy(ckpts[1], tmp_path / "ckpt")
  s = _suite(tmp_path, {1: ckpt})
  store = results.ResultStore(tmp_path / "store")
  key = ("eval", "m", 1)
  evaluated = []

  def evaluate(model, step, config, params):
    evaluated.append((step, str(params["embed"]["embedding"].dtype)))
    return _summary(model, step, config, params)

  def summary_of(path):
    return U.param_summary(checkpoint.restore(path))["sums"]

  sweep.run_sweep(s, evaluate, store, progress=False)
  sweep.run_sweep(s, evaluate, store, progress=False)
  assert evaluated == [(1, "float32")]                              # unchanged: reused
  # Re-converted in place: other weights at the same path.
  orbax_format.save(ckpt, U.random_params(CONFIG, seed=77), CONFIG, overwrite=True)
  with caplog.at_level(logging.WARNING, logger="opt_jax.sweep"):
    report = sweep.run_sweep(s, evaluate, store, progress=False)
  assert report.recomputed == [key] and len(evaluated) == 2
  assert [r.getMessage() for r in caplog.records] == [
      f"{store.path(key)}: stale result (checkpoint {ckpt} changed since (re-converted or "
      "replaced)): recomputing"]
  np.testing.assert_array_equal(store.read(key)[0]["sums"], summary_of(ckpt))
  # The manifest now points at another checkpoint directory (identical bytes elsewhere).
  moved = _copy(ckpts[3], tmp_path / "moved")
  s2 = _suite(tmp_path, {1: moved}, name="suite2.json")
  report = sweep.run_sweep(s2, evaluate, store, progress=False)
  assert report.recomputed == [key]
  np.testing.assert_array_equal(store.read(key)[0]["sums"], summary_of(moved))
  # Another restore dtype.
  report = sweep.run_sweep(s2, evaluate, store, progress=False, dtype=np.dtype("float16"))
  assert report.recomputed == [key] and evaluated[-1] == (1, "float16")
  assert store.read_meta(key)["identity"] == {**checkpoint.identity(moved),
                                              "restore_dtype": "float16"}
  assert sweep.run_sweep(s2, evaluate, store, progress=False, dtype=np.float16).skipped == [key]
  assert len(evaluated) == 4

  # A stale result whose recomputation fails is moved aside, not left to pass for a valid one.
  orbax_format.save(moved, U.random_params(CONFIG, seed=78), CONFIG, overwrite=True)
  os.remove(os.path.join(moved, "params", "layers.mlp.up_kernel", "0.0.0"))
  report = sweep.run_sweep(s2, evaluate, store, progress=False)
  assert list(report.failed) == [key] and not store.has(key)
  assert [n for n in os.listdir(os.path.dirname(store.path(key))) if ".stale-" in n]


# 6. Temporaries of killed writers are cleaned up; those of live ones never ---------------------

def test_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path, caplog):
  out = str(tmp_path / "model")
  signal_file = str(tmp_path / "params_written")
  code = textwrap.dedent(f"""
      import os, sys, time
      sys.path.insert(0, {os.path.join(REPO, "tests")!r})
      import _suite_util as U
      from opt_jax import families
      from opt_jax.checkpoints import orbax_format

      def hang(config, path):  # config.json is written after the params: stop there
        open({signal_file!r}, "w").close()
        time.sleep(600)
      families.write_config = hang
      orbax_format.save({out!r}, U.random_params(U.SIZES["tiny-a"], 0), U.SIZES["tiny-a"])
  """)
  child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": REPO})
  try:
    deadline = time.time() + 180
    while not os.path.exists(signal_file):
      if child.poll() is not None:
        pytest.fail("child exited early:\n" + child.stdout.read().decode())
      assert time.time() < deadline, "child never finished writing the params"
      time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
  finally:
    if child.poll() is None:
      child.kill()
  left = [n for n in os.listdir(tmp_path) if n.startswith(".model.tmp-")]
  assert len(left) == 1 and f"-{child.pid}." in left[0]
  assert os.path.isdir(tmp_path / left[0] / "params")             # the bulk of the model
  with caplog.at_level(logging.WARNING, logger="opt_jax.files"):
    orbax_format.save(out, U.random_params(CONFIG, 1), CONFIG)
  assert sorted(os.listdir(tmp_path)) == ["model", "params_written"]
  assert [r.getMessage() for r in caplog.records] == [
      f"removed {tmp_path / left[0]}, left by an interrupted run (process "
      f"{left[0].split('.tmp-')[1].rsplit('-', 1)[0]})"]


def test_temporaries_of_live_or_other_hosts_writers_are_kept(tmp_path, caplog):
  final = tmp_path / "out"
  ours = files.temporary_sibling(final)                     # this (live) process
  other_host = ours.replace(files.process_tag(), "123.456@some-other-host")
  dead = subprocess.Popen(["true"])
  dead.wait()
  gone = ours.replace(files.process_tag().split("@")[0], f"{dead.pid}.1")
  gone_old = gone.replace(".tmp-", ".old-")
  for d in (ours, other_host, gone):
    os.makedirs(os.path.join(d, "params"))
  os.makedirs(gone_old)
  (tmp_path / "unrelated.tmp-1").write_text("not ours")
  with caplog.at_level(logging.WARNING, logger="opt_jax.files"):
    removed = files.remove_stale_temporaries(final)
  # The old version moved aside by a writer killed between its two renames is put back.
  assert removed == [gone] and os.path.isdir(final) and not os.path.exists(gone_old)
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["out", os.path.basename(ours), os.path.basename(other_host), "unrelated.tmp-1"])
  messages = [r.getMessage() for r in caplog.records]
  assert any("another host, which may still be running" in m and other_host in m
             for m in messages)


# 7. A killed run's manifest is marked interrupted by the next run ------------------------------

def test_manifest_of_a_dead_run_is_marked_interrupted(ckpts, tmp_path):
  s = _suite(tmp_path, {1: ckpts[1]})
  store = results.ResultStore(tmp_path / "store")
  runs = tmp_path / "store" / "runs"
  runs.mkdir(parents=True)
  dead = subprocess.Popen(["true"])
  dead.wait()
  for name, writer in (("dead.json", f"{dead.pid}.1@{files.process_tag().split('@')[1]}"),
                       ("remote.json", "1.1@some-other-host"),
                       ("alive.json", files.process_tag())):
    (runs / name).write_text(json.dumps({"status": "running", "writer": writer}))
  sweep.run_sweep(s, _summary, store, progress=False)
  status = {n: json.loads((runs / n).read_text())["status"] for n in os.listdir(runs)}
  assert status.pop("dead.json") == "interrupted"
  assert status.pop("remote.json") == "running" and status.pop("alive.json") == "running"
  assert list(status.values()) == ["finished"]                      # this run's own manifest


# 11. Meshes: divisibility before restoring, specs checked before devices exist -----------------

def test_mesh_that_does_not_divide_the_model_fails_before_any_restore(ckpts, tmp_path):
  s = _suite(tmp_path, {1: ckpts[1]})
  mesh = AbstractMesh((1, 1, 3), sharding.AXES)

  def must_not_restore(*args, **kwargs):
    raise AssertionError("restored before checking the mesh")
  with pytest.raises(errors.InputError) as e:
    sweep.run_sweep(s, _summary, results.ResultStore(tmp_path / "store"), mesh=mesh,
                    restore=must_not_restore, progress=False)
  message = str(e.value)
  assert message.startswith(f"model m ({ckpts[1]}/config.json): cannot shard this model")
  assert "num_attention_heads=4 (logical dim 'heads') is not divisible by the model mesh axis (3)"\
      in message


def test_mesh_spec_is_checked_before_devices_are_created():
  with pytest.raises(errors.InputError, match="cannot parse 'garbage'"):
    sharding.devices_needed("garbage")
  assert sharding.devices_needed("data:2,model:4") == 8
  assert sharding.devices_needed("data:-1,model:4") is None
  # The planner simulates devices: an impossible spec fails at once instead of creating them.
  for spec, words in (("garbage", "cannot parse 'garbage'"),
                      ("data:100000", "needs 100000 simulated devices")):
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "tools.plan_mesh", f"--mesh={spec}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode != 0 and words in out.stderr, out.stderr[-2000:]
    assert time.time() - t0 < 60


# 13. Outputs follow the user's umask -----------------------------------------------------------

def test_outputs_honour_the_umask(ckpts, tmp_path):
  old = os.umask(0o027)
  try:
    ckpt = tmp_path / "ckpt"
    orbax_format.save(ckpt, U.random_params(CONFIG, seed=5), CONFIG)
    store = results.ResultStore(tmp_path / "store")
    report = sweep.run_sweep(_suite(tmp_path, {1: str(ckpt)}), _summary, store, progress=False)
    hf_dir = tmp_path / "hf"
    convert.convert(ckpt, hf_dir, output_format="hf")
  finally:
    os.umask(old)
  mode = lambda p: os.stat(p).st_mode & 0o777
  for d in (ckpt, ckpt / "params", tmp_path / "store", os.path.dirname(report.run_manifest),
            hf_dir):
    assert mode(d) == 0o750, d
  for f in (ckpt / "config.json", ckpt / "opt_jax.json", store.path(("eval", "m", 1)),
            report.run_manifest, hf_dir / "model.safetensors"):
    assert mode(f) == 0o640, f
