"""Subprocess of tests/test_sweep.py: a sweep whose evaluation blocks forever at one checkpoint.

usage: _sweep_child.py MANIFEST STORE_DIR SIGNAL_FILE BLOCK_AT
Evaluates checkpoints with `_suite_util.param_summary`; at the BLOCK_AT-th (0-based) evaluation it
writes SIGNAL_FILE and sleeps, so the parent can kill -9 it at a known point.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import _suite_util  # noqa: E402
from opt_jax import results, suite, sweep  # noqa: E402


def main(manifest: str, store_dir: str, signal_file: str, block_at: int) -> None:
  calls = [0]

  def evaluate(model, step, config, params):
    if calls[0] == block_at:
      tmp = signal_file + ".tmp"
      with open(tmp, "w") as f:
        f.write(f"{model.name} {step}\n")
      os.replace(tmp, signal_file)
      while True:
        time.sleep(1)
    calls[0] += 1
    return _suite_util.param_summary(params), {"num_tokens": 1}

  sweep.run_sweep(suite.load_suite(manifest), evaluate, results.ResultStore(store_dir),
                  experiment="kill", progress=False)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
