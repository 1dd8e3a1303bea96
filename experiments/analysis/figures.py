"""Helpers every analysis plot shares: models in size order, and atomic PNG + PDF files.

pandas + matplotlib's object API only (no pyplot state, no JAX).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from opt_jax import files


def model_order(df: pd.DataFrame) -> list[str]:
  """Model names from smallest to largest parameter count (ties keep table order)."""
  return list(df.groupby("model")["params"].first().sort_values(kind="stable").index)


def save(fig, path_stem: str, *, dpi: int, bbox_inches: str | None = None,
         exts: Sequence[str] = ("png", "pdf")) -> list[str]:
  """Writes path_stem.<ext> for each ext, each atomically; returns the paths.

  The figure's layout (constrained or tight) is solved by the first save and kept for the
  others rather than solved again. The caller closes pyplot figures.
  """
  paths = []
  for ext in exts:
    path = f"{path_stem}.{ext}"
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches=bbox_inches)
    paths.append(path)
    fig.set_layout_engine("none")
  return paths
