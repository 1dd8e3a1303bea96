"""Synthetic per-token trajectories with planted trends, shared by the trajectory tests."""

from __future__ import annotations

import numpy as np

KINDS = ("stagnated", "upward", "downward", "double_descent")


def log_steps(num: int = 30, first: float = 10.0, last: float = 10000.0) -> np.ndarray:
  """[num] distinct integer steps, log-spaced from first to last."""
  steps = np.unique(np.round(np.geomspace(first, last, num)).astype(np.int64))
  assert steps.shape[0] == num, "choose a range wide enough for distinct steps"
  return steps


def planted_losses(steps, per_kind: int = 40, noise: float = 0.02, seed: int = 0):
  """Per-token losses (nats) [4 * per_kind, C] of known kinds, in the order of KINDS.

  With u = log10(step) / log10(last step) in (0, 1]:
    stagnated: constant loss 3 plus noise;
    upward: loss rises linearly in log(step) (perplexity x ~e^1 over the run);
    downward: loss falls linearly in log(step);
    double_descent: falls until u = 0.6, rises until u = 0.9 by 1.6 nats, falls 0.3 nats by the
      end; over the last 90% of steps the rise dominates, so its OLS trend is upward.
  Noise: iid normal on the loss with std `noise` nats.
  Returns (losses float32 [N, C], kinds [N] str).
  """
  rng = np.random.default_rng(seed)
  u = np.log(steps) / np.log(steps[-1])                       # [C]
  shapes = {
      "stagnated": np.full_like(u, 3.0),
      "upward": 2.0 + 1.0 * u,
      "downward": 5.0 - 2.0 * u,
      "double_descent": np.interp(u, [0.0, 0.6, 0.9, 1.0], [6.0, 2.0, 3.6, 3.3]),
  }
  losses = np.concatenate([shapes[k][None, :] + noise * rng.standard_normal((per_kind, len(u)))
                           for k in KINDS])
  kinds = np.repeat(np.asarray(KINDS), per_kind)
  return losses.astype(np.float32), kinds
