"""Helpers every analysis plot shares: models in size order and their colours, a grid of panels,
and atomic PNG + PDF files.

pandas + matplotlib's object API only (no pyplot state, no JAX).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure

from opt_jax import files


def model_order(df: pd.DataFrame) -> list[str]:
  """Model names from smallest to largest parameter count (ties keep table order)."""
  return list(df.groupby("model")["params"].first().sort_values(kind="stable").index)


def model_colors(models: Sequence[str]) -> dict[str, str]:
  """One colour of matplotlib's cycle (C0 ... C9, then again) per model, in the order given."""
  return {m: f"C{i % 10}" for i, m in enumerate(models)}


def panel_grid(panels: int, max_columns: int, width: float, height: float):
  """A constrained-layout Figure of `panels` panels, at most `max_columns` a row, each `width` x
  `height` inches; returns (figure, its axes as a flat array, spare ones last)."""
  ncols = min(max_columns, panels)
  nrows = math.ceil(panels / ncols)
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def short_count(value: float, _pos=None) -> str:
  """A tick label for a count: 70M, 1.4B, 2K, 500."""
  for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if abs(value) >= scale:
      return f"{value / scale:.3g}{suffix}"
  return f"{value:.3g}"


def count_ticks(lo: float, hi: float) -> list[float]:
  """Log-axis ticks between lo and hi, fewer per decade the more decades there are: 1, 2, 5 x
  10^k up to 1.5 decades, 1 and 3 up to 3, then every power of ten (every other past 7 decades);
  every 1..9 x 10^k when the span is too short for two of those."""
  lo, hi = sorted((max(lo, 1e-300), max(hi, 1e-300)))
  decades = math.log10(hi / lo)
  first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
  for subs in ((1, 2, 5) if decades <= 1.5 else (1, 3) if decades <= 3 else (1,),
               range(1, 10)):
    step = 2 if decades > 7 and subs == (1,) else 1
    ticks = [m * 10.0 ** k for k in range(first, last + 1, step) for m in subs
             if lo <= m * 10.0 ** k <= hi]
    if len(ticks) >= 2:
      return ticks
  return ticks


def count_axis(ax, which: str = "x") -> None:
  """A log axis of counts (parameters) with labels that do not overlap (`count_ticks`),
  labelled 70M, 1.4B ...; minor ticks unlabelled."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel

  class CountLocator(ticker.Locator):
    def __call__(self):
      return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin, vmax):
      return count_ticks(vmin, vmax)

  axis = ax.xaxis if which == "x" else ax.yaxis
  axis.set_major_locator(CountLocator())
  axis.set_major_formatter(ticker.FuncFormatter(short_count))
  axis.set_minor_formatter(ticker.NullFormatter())


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
