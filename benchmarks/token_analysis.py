"""The whole token-trajectory analysis at the paper's size, timed (no plots).

  python benchmarks/token_analysis.py --tokens=102350 --sizes=6 --checkpoints=40

trajectories.analyze on --sizes random [tokens, checkpoints] float32 loss matrices (steps spaced
like OPT-1.3B's published checkpoints, validation perplexity falling with steps): the paper's
labels at the seven start fractions 0.1 ... 0.7, group curves, every size as a reference followed
in every size, group-level double descent, and the extras (agreement at matched steps and
perplexity, the per-token double-descent detector). Prints the wall time of the analysis and of
the labels alone, and the analysis's CPU time (process time: the fair number on a shared machine).
"""

import time

import numpy as np
from absl import app, flags

from experiments.analysis import trajectories, trends

_TOKENS = flags.DEFINE_integer("tokens", 102_350, "tokens (rows; the paper: 50 x 2047)")
_SIZES = flags.DEFINE_integer("sizes", 6, "model sizes")
_CHECKPOINTS = flags.DEFINE_integer("checkpoints", 40, "checkpoints per size")


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  n, c = _TOKENS.value, _CHECKPOINTS.value
  steps = np.round(np.linspace(260_000 / c, 260_000, c)).astype(np.int64)
  u = np.log(steps) / np.log(steps[-1])
  models = []
  for i in range(_SIZES.value):
    slope = rng.normal(0, 0.3, (n, 1))
    losses = (rng.normal(2.5, 0.8, (n, 1)) + slope * u[None, :]
              + rng.normal(0, 0.05, (n, c))).astype(np.float32)
    models.append(trajectories.ModelTrajectories(
        f"size{i}", steps, losses, flops=steps * 6e9 * 10 ** i,
        val_ppl=np.geomspace(40, 10 / (i + 1), c), params=10 ** (8 + i)))
  start, cpu = time.perf_counter(), time.process_time()
  result = trajectories.analyze(models)
  total, cpu = time.perf_counter() - start, time.process_time() - cpu
  start = time.perf_counter()
  for m in models:
    values = np.exp(m.losses.astype(np.float64))
    for fraction in trajectories.START_FRACTIONS:
      trends.classify_trends(values, m.steps, fraction)
  labels = time.perf_counter() - start
  shares = result.percentages.groupby("label", sort=False).percent.mean()
  print(f"{n} tokens x {len(models)} sizes x {len(trajectories.START_FRACTIONS)} start fractions "
        f"x {c} checkpoints")
  print(f"analyze (everything but plots): {total:.2f} s wall, {cpu:.2f} s CPU; the labels alone: "
        f"{labels:.2f} s wall")
  print("mean shares: " + ", ".join(f"{k} {v:.1f}%" for k, v in shares.items()))


if __name__ == "__main__":
  app.run(main)
