"""Sweeps over a tiny suite (2 sizes x 4 checkpoints): equality, resume, kill -9, prefetch, mesh."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _suite_util as U
from opt_jax import families, results, scoring, sharding, suite, sweep
from opt_jax.checkpoints import checkpoint
from opt_jax.tokenizer import load_tokenizer

SCORER_KW = dict(batch_size=4, max_length=32)
ROLLING_KW = dict(context_length=16, stride=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("suite")
  return suite.load_suite(U.make_suite(str(root)))


def _rolling_evaluator(cache, compiles):
  def evaluate(model, step, config, params):
    scorer = cache.get(config, params, cache.tokenizer(model))
    lps = scorer.loglikelihood_rolling(U.CORPUS, **ROLLING_KW)
    compiles.append((model.name, scorer.num_compilations))
    n = sum(len(x) for x in lps)
    return ({"logprobs": np.concatenate(lps), "lengths": np.array([len(x) for x in lps])},
            {"num_tokens": n})
  return evaluate


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
  store = results.ResultStore(tmp_path_factory.mktemp("store"))
  compiles = []
  # Programs are shared by every Scorer of a spec in the process, and earlier test files in this
  # worker may have compiled these very ones: start from empty caches so this sweep compiles its
  # own (one per size), as a fresh binary would.
  jax.clear_caches()
  evaluate = _rolling_evaluator(sweep.ScorerCache(**SCORER_KW), compiles)
  report = sweep.run_sweep(tiny, evaluate, store, experiment="rolling", progress=False,
                           run_info={"flag": "value"})
  return store, report, compiles


def test_sweep_equals_each_checkpoint_evaluated_alone(tiny, swept):
  store, report, compiles = swept
  assert report.evaluated == [("rolling", m.name, s) for m, s, _ in tiny.checkpoints()]
  assert len(report.evaluated) == 8 and not report.skipped
  # Later checkpoints reuse their size's program through Scorer.set_params: the count of
  # programs traced for the size's spec (process-wide; other tests may have compiled them
  # first) does not grow after its first checkpoint, and is at least its one bucket.
  for name in ("tiny-a", "tiny-b"):
    counts = [c for n, c in compiles if n == name]
    assert len(counts) == 4 and len(set(counts)) == 1 and counts[0] >= 1, compiles
  for model in tiny.models:
    # Alone: restore outside the sweep, a separate Scorer, checkpoints in reverse order.
    alone = None
    for step in reversed(model.steps):
      params = checkpoint.restore(model.path(step))
      if alone is None:
        alone = scoring.Scorer(checkpoint.load_config(model.path(step)), params,
                               tokenizer=load_tokenizer(model.path(step)), **SCORER_KW)
      else:
        alone.set_params(params)
      want = np.concatenate(alone.loglikelihood_rolling(U.CORPUS, **ROLLING_KW))
      arrays, meta = store.read(("rolling", model.name, step))
      np.testing.assert_array_equal(arrays["logprobs"], want)
      assert meta["num_tokens"] == len(want) == arrays["lengths"].sum()
      assert meta["tokens"] == step * U.TOKENS_PER_STEP
      assert meta["flops"] == 6.0 * model.params * step * U.TOKENS_PER_STEP
      assert meta["params"] == model.params and meta["path"] == model.path(step)
  # The checkpoints really differ (else equality above would prove little).
  a10 = store.read(("rolling", "tiny-a", 10))[0]["logprobs"]
  a20 = store.read(("rolling", "tiny-a", 20))[0]["logprobs"]
  assert np.abs(a10 - a20).mean() > 0.1


def test_second_run_evaluates_nothing(tiny, swept):
  store, first, _ = swept

  def must_not_run(*args):
    raise AssertionError(f"evaluated {args[:2]} again")
  report = sweep.run_sweep(tiny, must_not_run, store, experiment="rolling", progress=False)
  assert report.evaluated == [] and report.skipped == first.evaluated
  # Both runs left a run manifest: flags, suite, versions, times, status.
  runs = sorted(os.listdir(os.path.join(store.root, "runs")))
  assert len(runs) == 2
  with open(first.run_manifest) as f:
    manifest = json.load(f)
  assert manifest["status"] == "finished" and manifest["evaluated"] == 8
  assert manifest["run_info"] == {"flag": "value"}
  assert manifest["suite"]["models"][0]["checkpoints"]["10"] == tiny.models[0].path(10)
  assert manifest["versions"]["opt_jax"] and manifest["started"] <= manifest["finished"]
  # The time spent making programs (jax.monitoring events), and its share of the sweep: the
  # first run compiled at least one scoring program per size; the second, which restored and
  # evaluated nothing, compiled nothing.
  c = manifest["compile"]
  assert c["backend_compiles"] >= 2 and 0 < c["compile_seconds"] <= c["seconds"]
  assert c["seconds"] == pytest.approx(c["trace_seconds"] + c["lower_seconds"]
                                       + c["compile_seconds"])
  assert c["share_of_wall"] == pytest.approx(c["seconds"] / manifest["wall_seconds"])
  assert 0 < c["share_of_wall"] < 1 and first.compile == c
  assert report.compile["backend_compiles"] == 0 and report.compile["seconds"] == 0


def test_kill_9_mid_sweep_loses_at_most_the_checkpoint_in_flight(tiny, tmp_path):
  store = results.ResultStore(tmp_path / "store")
  signal_file = str(tmp_path / "blocked")
  child = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "_sweep_child.py"), tiny.source,
       store.root, signal_file, "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 120
    while not os.path.exists(signal_file):
      if child.poll() is not None:
        pytest.fail("child exited early:\n" + child.stdout.read().decode())
      if time.time() > deadline:
        pytest.fail("child never reached the third checkpoint")
      time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
  finally:
    if child.poll() is None:
      child.kill()
  with open(signal_file) as f:
    assert f.read().split() == ["tiny-a", "30"]
  # The two checkpoints finished before the kill are stored; the one in flight is not.
  done = store.keys(("kill",))
  assert done == [("kill", "tiny-a", 10), ("kill", "tiny-a", 20)]
  before = {k: store.read(k)[0]["sums"] for k in done}
  manifests = os.listdir(os.path.join(store.root, "runs"))
  killed = os.path.join(store.root, "runs", manifests[0])
  with open(killed) as f:
    assert json.load(f)["status"] == "running"                  # killed: never finished

  evaluated = []

  def evaluate(model, step, config, params):
    evaluated.append((model.name, step))
    return U.param_summary(params), {}
  report = sweep.run_sweep(tiny, evaluate, store, experiment="kill", progress=False)
  assert evaluated == [("tiny-a", 30), ("tiny-a", 40)] + [("tiny-b", s) for s in U.STEPS]
  assert report.skipped == done
  with open(killed) as f:
    assert json.load(f)["status"] == "interrupted"              # noticed by the next run
  assert len(store.keys(("kill",))) == 8
  for k, sums in before.items():
    np.testing.assert_array_equal(store.read(k)[0]["sums"], sums)
  # Every result equals the evaluation of its checkpoint alone.
  for m, step, path in tiny.checkpoints():
    np.testing.assert_array_equal(store.read(("kill", m.name, step))[0]["sums"],
                                  U.param_summary(checkpoint.restore(path))["sums"])


def test_prefetch_hides_restore_time(tiny, tmp_path, capsys):
  one = tiny.select(["tiny-a"])
  delay = 0.5

  def slow_restore(path, **kw):
    time.sleep(delay)
    return checkpoint.restore(path, **kw)

  def evaluate(model, step, config, params):
    time.sleep(2 * delay)
    return U.param_summary(params), {"num_tokens": 1000}

  runs = {}
  for prefetch in (False, True):
    store = results.ResultStore(tmp_path / str(prefetch))
    runs[prefetch] = sweep.run_sweep(one, evaluate, store, prefetch=prefetch, restore=slow_restore,
                                     progress=prefetch)
  serial, overlapped = runs[False], runs[True]
  later = serial.evaluated[1:]   # the first restore can never be hidden
  assert sum(serial.wait_seconds[k] for k in later) >= 3 * delay
  # Prefetched: the main loop hardly waits for restores after the first.
  assert sum(overlapped.wait_seconds[k] for k in later) < 0.5 * sum(
      overlapped.restore_seconds[k] for k in later)
  assert overlapped.wall_seconds < serial.wall_seconds - 2 * delay
  err = capsys.readouterr().err
  assert "4/4" in err and "tok/s" in err


def test_mesh_restores_onto_param_shardings(tiny, tmp_path):
  mesh = sharding.make_mesh("data:1")
  one = tiny.select(["tiny-b"])
  seen = []

  def spy_restore(path, shardings=None, dtype=None):
    seen.append(shardings)
    return checkpoint.restore(path, shardings=shardings, dtype=dtype)

  def evaluate(model, step, config, params):
    want = sharding.param_shardings(config, mesh)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, params, want)))
    return {}, {}
  sweep.run_sweep(one, evaluate, results.ResultStore(tmp_path), mesh=mesh, restore=spy_restore,
                  progress=False)
  config = checkpoint.load_config(one.models[0].path(10))
  assert len(seen) == 4 and all(s is not None for s in seen)
  assert jax.tree.structure(seen[0]) == jax.tree.structure(sharding.param_shardings(config, mesh))


def test_unconverted_folder_is_rejected_by_the_manifest_check_before_any_sweep(tiny, tmp_path):
  m = tiny.models[0]
  broken = tmp_path / "broken"
  os.makedirs(broken)
  # no params/
  families.write_config(checkpoint.load_config(m.path(10)), str(broken / "config.json"))
  manifest = {"name": "b", "models": [{"name": "m", "params": m.params, "tokens_per_step": 1,
                                       "checkpoints": {"1": m.path(10), "2": str(broken),
                                                       "3": m.path(20)}}]}
  path = tmp_path / "s.json"
  path.write_text(json.dumps(manifest))
  with pytest.raises(suite.SuiteError, match=f"model 'm' step 2: {broken} is not an opt_jax "
                                             f"checkpoint: it lacks opt_jax.json, params"):
    suite.load_suite(path)
