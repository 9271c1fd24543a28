"""PR-curve figure, AP table, detection drawing and the k-means anchor plots."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from utils.boxes import wh_iou
from utils.metrics import DetectionEvaluator
from utils.visualize import (
    PAPER_CLUSTER_IOU,
    class_colour,
    draw_detections,
    format_ap_table,
    plot_anchor_clusters,
    plot_iou_vs_k,
    plot_pr_curves,
)

NAMES = ["cat", "dog", "horse"]


@pytest.fixture(scope="module")
def res():
    """A small result: cat found twice of two; dog once of two, after a stray, no horses."""
    ground_truths = [
        torch.tensor([[0.1, 0.1, 0.4, 0.4, 0, 0], [0.5, 0.5, 0.9, 0.9, 1, 0]]),
        torch.tensor([[0.2, 0.2, 0.6, 0.6, 0, 0], [0.0, 0.5, 0.3, 0.9, 1, 0]]),
    ]
    detections = [
        torch.tensor([[0.1, 0.1, 0.4, 0.4, 0.9, 0], [0.5, 0.5, 0.9, 0.9, 0.8, 1]]),
        torch.tensor([[0.2, 0.2, 0.6, 0.6, 0.7, 0], [0.6, 0.0, 0.9, 0.3, 0.95, 1]]),
    ]
    evaluator = DetectionEvaluator(3, class_names=NAMES)
    evaluator.update(detections, ground_truths)
    return evaluator.compute()


def test_plot_pr_curves_one_panel_per_class(res, tmp_path):
    fig = plot_pr_curves(res, NAMES, ncols=2)
    assert isinstance(fig, Figure)
    visible = [ax for ax in fig.axes if ax.axison]
    assert len(visible) == 3 and len(fig.axes) == 4
    assert visible[0].get_title() == "cat: AP07 1.000  AP12 1.000"
    assert visible[1].get_title() == "dog: AP07 0.273  AP12 0.250"
    assert visible[2].get_title() == "horse: no objects" and not visible[2].lines
    precision, recall = res["curves"][1]
    np.testing.assert_allclose(visible[1].lines[0].get_xdata(), recall)
    np.testing.assert_allclose(visible[1].lines[0].get_ydata(), precision)
    np.testing.assert_allclose(visible[1].lines[1].get_ydata(), [0.5, 0.5])  # envelope
    fig.savefig(tmp_path / "pr.png")
    assert Image.open(tmp_path / "pr.png").size[0] > 100
    with SummaryWriter(tmp_path / "logs") as writer:
        writer.add_figure("val/pr_curves", plot_pr_curves(res), 0)
    assert sum(f.stat().st_size for f in (tmp_path / "logs").iterdir()) > 1000


def test_plot_thins_long_curves():
    n = 10_000
    res = {
        "per_class": {"voc07": [0.5], "voc12": [0.5]},
        "curves": [(np.linspace(1, 0, n), np.linspace(0, 1, n))],
    }
    (ax,) = [ax for ax in plot_pr_curves(res, ncols=1).axes if ax.axison]
    assert len(ax.lines[0].get_xdata()) == 2000 and ax.lines[0].get_xdata()[-1] == 1.0


def test_format_ap_table(res):
    table = format_ap_table(res, NAMES)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "GT", "VOC07", "VOC12", "COCO", "AP50", "AP75"]
    assert lines[2].split()[:4] == ["cat", "2", "100.00", "100.00"]
    assert lines[3].split()[:4] == ["dog", "2", "27.27", "25.00"]
    assert lines[4].split() == ["horse", "0", "-", "-", "-", "-", "-"]
    mean = lines[-1].split()
    assert mean[:4] == ["mean", "4", f"{100 * res['map_voc07']:.2f}", "62.50"]
    assert format_ap_table(res) == table  # the names come with the result
    with pytest.raises(ValueError, match="2 class names for a result with 3 classes"):
        format_ap_table(res, NAMES[:2])


def black(size=200) -> Image.Image:
    return Image.new("RGB", (size, size))


def test_draw_detections_boxes_labels_and_threshold():
    detections = torch.tensor([[0.25, 0.25, 0.75, 0.75, 0.9, 1], [0.05, 0.05, 0.2, 0.2, 0.1, 2]])
    ground_truths = np.array([[0.6, 0.1, 0.9, 0.3, 0, 0], [0.05, 0.8, 0.3, 0.95, 0, 1]])
    image = black()
    drawn = draw_detections(image, detections, NAMES, ground_truths=ground_truths)
    pixels = np.asarray(drawn)
    assert drawn.size == (200, 200) and not np.asarray(image).any()  # the input is untouched
    assert tuple(pixels[150, 100]) == class_colour(1)  # bottom edge of the dog box
    assert tuple(pixels[40, 20]) == (0, 0, 0)  # the 0.1 box is below the threshold
    assert tuple(pixels[60, 170]) == (255, 255, 255)  # ground truth
    assert tuple(pixels[190, 30]) == (150, 150, 150)  # difficult ground truth
    label_area = pixels[30:50, 50:110]  # the tag sits above the box
    assert (label_area == class_colour(1)).all(-1).sum() > 100
    lower = draw_detections(black(), detections, NAMES, score_threshold=0.05)
    assert tuple(np.asarray(lower)[40, 20]) == class_colour(2)


def test_draw_detections_takes_tensors_and_empty_detections():
    tensor = torch.rand(3, 64, 96)
    as_pil = Image.fromarray((tensor * 255).round().byte().permute(1, 2, 0).numpy())
    detections = np.array([[0.1, 0.1, 0.9, 0.9, 0.8, 0]])
    np.testing.assert_array_equal(
        np.asarray(draw_detections(tensor, detections, NAMES)),
        np.asarray(draw_detections(as_pil, detections, NAMES)),
    )
    empty = draw_detections(as_pil, torch.zeros((0, 6)), NAMES)
    np.testing.assert_array_equal(np.asarray(empty), np.asarray(as_pil))


def test_draw_detections_refuses_bad_input():
    with pytest.raises(TypeError, match="pass a PIL image or a \\[3, H, W\\] tensor"):
        draw_detections(torch.zeros(64, 64), np.zeros((0, 6)), NAMES)
    with pytest.raises(ValueError, match="detections has shape \\[2, 4\\]"):
        draw_detections(black(), np.zeros((2, 4)), NAMES)


def test_class_colours_are_distinct():
    colours = {class_colour(c) for c in range(20)}
    assert len(colours) == 20


ANCHORS = torch.tensor([[1.3, 1.95], [3.9, 6.5], [9.1, 7.8]])  # grid cells


def test_plot_anchor_clusters_colours_boxes_by_their_anchor_in_pixels(tmp_path):
    wh = torch.rand(300, 2, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    fig = plot_anchor_clusters(wh, ANCHORS, img_size=416)
    (ax,) = fig.axes
    boxes, centres = ax.collections
    np.testing.assert_allclose(boxes.get_offsets(), wh.numpy() * 416, rtol=1e-6)
    np.testing.assert_allclose(centres.get_offsets(), ANCHORS.numpy() * 32, rtol=1e-6)
    best_iou, cluster = wh_iou(wh[:, None] * 13, ANCHORS[None]).max(dim=1)  # in grid cells
    expected = np.array([class_colour(c) for c in cluster.tolist()]) / 255
    np.testing.assert_allclose(boxes.get_facecolors()[:, :3], expected, atol=1e-6)
    assert [text.get_text() for text in ax.texts] == ["1.30x1.95", "3.90x6.50", "9.10x7.80"]
    assert f"mean IoU {100 * best_iou.mean().item():.2f}%" in ax.get_title()
    assert "pixels of a 416x416 input" in ax.get_xlabel() and "height" in ax.get_ylabel()
    fig.savefig(tmp_path / "clusters.png")
    assert Image.open(tmp_path / "clusters.png").size[0] > 300
    at_608 = plot_anchor_clusters(wh, ANCHORS, img_size=608).axes[0]
    np.testing.assert_allclose(at_608.collections[0].get_offsets(), wh.numpy() * 608, rtol=1e-6)
    np.testing.assert_allclose(at_608.collections[1].get_offsets(), ANCHORS.numpy() * 32)


def test_plot_anchor_clusters_subsamples_many_boxes():
    wh = np.random.default_rng(0).uniform(0.01, 1, size=(40_000, 2))
    fig = plot_anchor_clusters(wh, ANCHORS.numpy(), max_points=1000)
    (ax,) = fig.axes
    assert len(ax.collections[0].get_offsets()) == 1000
    assert "over 40000 boxes" in ax.get_title() and ax.texts[0].get_text() == "1.30x1.95"
    with pytest.raises(ValueError, match="must both be \\[N, 2\\]"):
        plot_anchor_clusters(wh[:, :1], ANCHORS)


def test_plot_iou_vs_k_marks_the_papers_points():
    fig = plot_iou_vs_k({3: 0.55, 1: 0.3, 5: 0.62})
    (ax,) = fig.axes
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata(), [1, 3, 5])
    np.testing.assert_allclose(line.get_ydata(), [30.0, 55.0, 62.0])
    (paper,) = ax.collections
    np.testing.assert_allclose(paper.get_offsets(), [[5, 61.0], [9, 67.2]])
    assert PAPER_CLUSTER_IOU == {5: 61.0, 9: 67.2}
    with pytest.raises(ValueError, match="no results"):
        plot_iou_vs_k({})
