"""Tick labels of the analysis plots (experiments/analysis/figures.py)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from experiments.analysis import figures  # noqa: E402


@pytest.mark.parametrize("lo, hi", [(70e6, 410e6), (14e6, 12e9), (125e6, 175e9), (1e3, 3e3)])
def test_parameter_axis_labels_do_not_overlap(lo, hi):
  fig, ax = plt.subplots(figsize=(4.3, 3.4))
  ax.plot([lo, hi], [0.3, 0.5], "o-")
  ax.set_xscale("log")
  figures.count_axis(ax)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels(which="both")
           if t.get_visible() and t.get_text()
           and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
  plt.close(fig)
  assert len(boxes) >= 1
  boxes.sort(key=lambda b: b.x0)
  for a, b in zip(boxes, boxes[1:]):
    assert a.x1 < b.x0, (lo, hi, [(x.x0, x.x1) for x in boxes])


def test_short_count_labels():
  assert [figures.short_count(v) for v in (70e6, 1.4e9, 2000, 500, 12e9)] == [
      "70M", "1.4B", "2K", "500", "12B"]
