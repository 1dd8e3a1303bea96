r"""Does prefetching hide checkpoint restores? A 6-checkpoint sweep of an OPT-125M-shaped model.

  python -m benchmarks.sweep_prefetch [--checkpoints=6 --preset=125m --repeats=2]
  python -m benchmarks.sweep_prefetch --simulated_read_mbps=100   # I/O-bound restores

Writes --checkpoints random fp32 checkpoints of the preset's shape
(opt_jax.checkpoints.orbax_format.save) to a temporary folder, measures how long one restore takes, then sizes the evaluation (Scorer.
rolling_tokens on a fixed set of random token windows) so that evaluating a checkpoint takes about
as long as restoring it. Then it runs the same sweep (opt_jax.sweep.run_sweep) without and with
prefetch, --repeats times each, alternating, and reports:

  E        sum of the evaluation times of the sweep without prefetch (evaluations running alone)
  T        wall time of the sweep with prefetch
  T / E    the issue's criterion (target <= 1.15)
  bound    1 + R0 / E: the first restore can never overlap an evaluation, so T / E >= bound
  (T - R0) / E   the time beyond the evaluations once the first checkpoint is in memory

Compilation happens before the timed sweeps (the evaluator's Scorer is built and warmed on the
first checkpoint; the sweeps reuse it through Scorer.set_params, as a real sweep does after its
first checkpoint). On a CPU-only machine a real restore (tensorstore decoding, copies) competes
with the evaluation for the same cores, so no overlap is possible there: both are CPU-bound. With
--simulated_read_mbps the restore waits on (simulated) storage instead, the case prefetching is
for: checkpoints on disk or network storage, evaluation on an accelerator.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from opt_jax import results, suite, sweep
from opt_jax.checkpoints import checkpoint, orbax_format
from opt_jax import families
from opt_jax.model import param_shapes

_CHECKPOINTS = flags.DEFINE_integer("checkpoints", 6, "Checkpoints in the sweep.")
_PRESET = flags.DEFINE_string("preset", "125m", "OPT preset giving the model's shape.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Sweeps with and without prefetch (medians kept).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Windows per forward pass.")
_LENGTH = flags.DEFINE_integer("length", 128, "Window length in tokens (shrunk if one batch "
                               "already takes longer than a restore).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the checkpoints (default: temporary, "
                               "removed at the end).")
_SIM_MBPS = flags.DEFINE_float("simulated_read_mbps", 0.0, "If > 0, replace the real restore "
                                "by a wait of checkpoint bytes / this rate (MB/s) plus a "
                                "device_put of a host copy: an I/O-bound restore that leaves the "
                                "CPU to the evaluation (see simulated_restore).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def write_checkpoints(root: str, config, n: int) -> dict[str, str]:
  shapes = param_shapes(config)
  paths = {}
  for i in range(n):
    rng = np.random.default_rng(i)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)), shapes)
    path = os.path.join(root, f"step{1000 * (i + 1)}")
    orbax_format.save(path, params, config)
    paths[str(1000 * (i + 1))] = path
    del params
  return paths


def simulated_restore(path: str, mbps: float):
  """A restore that waits nbytes / (mbps MB/s), as a read from slow storage would, then hands out
  one host copy of the params (read once, up front) at almost no CPU cost. Models the case where a
  restore waits on storage rather than on the CPU (what an accelerator host sees); the numbers
  are the same for every checkpoint, which does not matter for timing."""
  host = jax.tree.map(np.asarray, checkpoint.restore(path))
  nbytes = sum(a.nbytes for a in jax.tree.leaves(host))
  seconds = nbytes / (mbps * 1e6)

  def restore(p, shardings=None, dtype=None):
    del p, dtype
    time.sleep(seconds)
    return jax.device_put(host, shardings)
  return restore, seconds


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  config = families.preset(_PRESET.value)
  root = _WORKDIR.value or tempfile.mkdtemp(prefix="sweep_prefetch_")
  os.makedirs(root, exist_ok=True)
  try:
    t0 = time.perf_counter()
    ckpts = write_checkpoints(os.path.join(root, "ckpt"), config, _CHECKPOINTS.value)
    print(f"wrote {len(ckpts)} checkpoints of opt-{_PRESET.value} ({config.num_params():,} params,"
          f" fp32) in {time.perf_counter() - t0:.1f}s")
    manifest = {"name": "bench", "models": [{"name": f"opt-{_PRESET.value}",
                                            "params": config.num_params(),
                                            "tokens_per_step": 500_000, "checkpoints": ckpts}]}
    path = os.path.join(root, "suite.json")
    suite.save_suite(manifest, path)
    s = suite.load_suite(path)
    first = s.models[0].path(s.models[0].steps[0])

    if _SIM_MBPS.value > 0:
      restore_fn, t_restore = simulated_restore(first, _SIM_MBPS.value)
      print(f"simulated I/O-bound restore at {_SIM_MBPS.value:g} MB/s: {t_restore:.2f}s per "
            "checkpoint")
    else:
      restore_fn = checkpoint.restore
      restore = lambda p=first: jax.block_until_ready(checkpoint.restore(p))
      restore()                                                   # warm the page cache / orbax
      t_restore = _median_time(restore, 3)
      print(f"restore: {t_restore:.2f}s per checkpoint")

    # Size the evaluation so that it takes about as long as a restore.
    cache = sweep.ScorerCache(batch_size=_BATCH.value, max_length=_LENGTH.value)
    params = checkpoint.restore(first)
    rng = np.random.default_rng(0)
    length = _LENGTH.value

    def windows(n_batches: int, length: int) -> list[list[int]]:
      # Each document is </s> + `length` tokens: exactly one window of `length` inputs.
      return [[2] + rng.integers(4, config.vocab_size, length).tolist()
              for _ in range(n_batches * _BATCH.value)]

    while True:
      docs = windows(1, length)
      scorer = cache.get(config, params)
      scorer.rolling_tokens(docs, context_length=length)           # compile
      t_batch = _median_time(lambda: scorer.rolling_tokens(docs, context_length=length), 2)
      if t_batch <= 1.25 * t_restore or length <= 16:
        break
      length //= 2
    n_batches = max(1, round(t_restore / t_batch))
    docs = windows(n_batches, length)
    scorer.rolling_tokens(docs, context_length=length)
    t_eval = _median_time(lambda: scorer.rolling_tokens(docs, context_length=length), 2)
    print(f"evaluation: {n_batches} batch(es) of {_BATCH.value} x {length} tokens, "
          f"{t_eval:.2f}s per checkpoint (restore {t_restore:.2f}s, ratio "
          f"{t_eval / t_restore:.2f})")
    del params

    def evaluate(model, step, config_, params_):
      sc = cache.get(config_, params_)
      lps = sc.rolling_tokens(docs, context_length=length)
      return {"nll": np.array([-x.sum() for x in lps])}, {"num_tokens": sum(map(len, lps))}

    runs: dict[bool, list[sweep.SweepReport]] = {False: [], True: []}
    for r in range(_REPEATS.value):
      for prefetch in (False, True):
        store = results.ResultStore(os.path.join(root, f"store-{prefetch}-{r}"))
        rep = sweep.run_sweep(s, evaluate, store, prefetch=prefetch, progress=False,
                              restore=restore_fn)
        runs[prefetch].append(rep)
        first_key = rep.evaluated[0]
        print(f"  repeat {r} prefetch={prefetch!s:5}: wall {rep.wall_seconds:6.2f}s, "
              f"sum eval {rep.total_eval_seconds:6.2f}s, sum restore "
              f"{sum(rep.restore_seconds.values()):6.2f}s, waited "
              f"{sum(rep.wait_seconds.values()):6.2f}s (first {rep.wait_seconds[first_key]:.2f}s)")

    med = lambda xs: statistics.median(xs)
    e_alone = med([r.total_eval_seconds for r in runs[False]])
    t_serial = med([r.wall_seconds for r in runs[False]])
    t_pref = med([r.wall_seconds for r in runs[True]])
    e_pref = med([r.total_eval_seconds for r in runs[True]])
    r0 = med([r.wait_seconds[r.evaluated[0]] for r in runs[True]])
    figures = {
        "device": str(jax.devices()[0]), "checkpoints": _CHECKPOINTS.value,
        "simulated_read_mbps": _SIM_MBPS.value,
        "preset": _PRESET.value, "restore_s": t_restore, "eval_s": t_eval,
        "eval_tokens_per_checkpoint": n_batches * _BATCH.value * length,
        "sum_eval_alone_s": e_alone, "wall_no_prefetch_s": t_serial, "wall_prefetch_s": t_pref,
        "sum_eval_during_prefetch_s": e_pref, "first_restore_s": r0,
        "ratio": t_pref / e_alone, "bound": 1 + r0 / e_alone,
        "ratio_after_first_restore": (t_pref - r0) / e_alone,
        "ratio_no_prefetch": t_serial / e_alone,
    }
    print(f"\nsum of evaluations E = {e_alone:.2f}s (no prefetch; {e_pref:.2f}s while prefetching)")
    print(f"no prefetch: T = {t_serial:.2f}s  T/E = {figures['ratio_no_prefetch']:.3f}")
    print(f"prefetch:    T = {t_pref:.2f}s  T/E = {figures['ratio']:.3f}  "
          f"(bound 1 + R0/E = {figures['bound']:.3f}; (T - R0)/E = "
          f"{figures['ratio_after_first_restore']:.3f}; target 1.15)")
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(figures, f, indent=2)
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
