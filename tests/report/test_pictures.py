"""The reconstruction grid's title (a trial's title is long): wrapped to the figure and drawn in its own
band above the first row, never over the images."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch

from tldr_core.report.pictures import grid_figure

TITLE = "trial 12 (vector-matrix): quality 0.312, quality 0.312, label agreement 0.97 on mnist-bundled"


@pytest.mark.parametrize("classes, per_class", [(10, 4), (10, 20), (3, 2), (2, 1)])
def test_grid_title_is_above_the_images_and_inside_the_figure(classes, per_class):
    images = torch.rand(classes * per_class, 1, 8, 8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    fig = grid_figure(images, labels, [str(c) for c in range(classes)], title=TITLE)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        title = fig._suptitle.get_window_extent(renderer)
        top_of_images = max(ax.get_window_extent(renderer).y1 for ax in fig.axes)
        assert title.y0 >= top_of_images  # no overlap with the first row
        assert 0 <= title.x0 and title.x1 <= fig.bbox.width and title.y1 <= fig.bbox.height  # not cut off
        assert "\n" in fig._suptitle.get_text() or classes * per_class > 20  # wrapped where the figure is narrow
    finally:
        plt.close(fig)


def test_grid_without_a_title_keeps_its_size():
    labels = torch.arange(3).repeat_interleave(2)
    fig = grid_figure(torch.rand(6, 1, 8, 8), labels, ["a", "b", "c"])
    try:
        assert fig._suptitle is None and fig.get_figheight() == pytest.approx(3 * 0.9 + 0.3)
    finally:
        plt.close(fig)
