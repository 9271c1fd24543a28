"""Pictures and tables of evaluation results: PR curves, an AP table, detections drawn on images.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot, no display,
no global figure registry), so they can go to ``SummaryWriter.add_figure`` or ``savefig``.
Boxes are normalised xyxy, as everywhere in the project.
"""

import colorsys
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from utils.anchors import STRIDE
from utils.boxes import wh_iou
from utils.fileio import atomic_open

__all__ = [
    "PAPER_CLUSTER_IOU",
    "class_colour",
    "draw_detections",
    "format_ap_table",
    "plot_anchor_clusters",
    "plot_iou_vs_k",
    "plot_pr_curves",
    "plot_training_history",
    "save_figure",
]

MAX_PLOTTED_POINTS = 2000
GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def _names(res: dict, class_names) -> list[str]:
    """Class names from the argument, else from the result, else the indices."""
    num_classes = len(res["per_class"]["voc07"])
    names = list(class_names if class_names is not None else res.get("class_names") or [])
    if names and len(names) != num_classes:
        raise ValueError(
            f"utils.visualize: {len(names)} class names for a result with {num_classes} "
            f"classes; pass the class names the evaluator was built with"
        )
    return names or [str(c) for c in range(num_classes)]


def _thin(values: np.ndarray, max_points: int) -> np.ndarray:
    """At most ``max_points`` evenly spaced entries of ``[n]`` values, the last one kept."""
    if len(values) <= max_points:
        return values
    return values[np.unique(np.linspace(0, len(values) - 1, max_points).round().astype(int))]


def plot_pr_curves(res: dict, class_names=None, *, ncols: int = 5) -> Figure:
    """A grid of per-class precision/recall curves at IoU 0.5 with VOC07/VOC12 AP in the titles.

    ``res`` is ``DetectionEvaluator.compute()``'s result; each panel shows the raw curve and its
    monotone envelope (whose area is the VOC12 AP). Classes without objects get an empty panel.
    """
    names = _names(res, class_names)
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(3 * ncols, 2.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True)).ravel()
    for c, ax in enumerate(axes):
        if c >= len(names):
            ax.set_axis_off()
            continue
        ap07, ap12 = res["per_class"]["voc07"][c], res["per_class"]["voc12"][c]
        precision, recall = (np.asarray(v, dtype=np.float64) for v in res["curves"][c])
        if math.isnan(ap07):
            ax.set_title(f"{names[c]}: no objects", fontsize=9)
        else:
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            ax.plot(_thin(recall, MAX_PLOTTED_POINTS), _thin(precision, MAX_PLOTTED_POINTS), lw=0.8)
            ax.plot(_thin(recall, MAX_PLOTTED_POINTS), _thin(envelope, MAX_PLOTTED_POINTS), lw=1.2)
            ax.set_title(f"{names[c]}: AP07 {ap07:.3f}  AP12 {ap12:.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    for ax in axes[(nrows - 1) * ncols :]:
        ax.set_xlabel("recall")
    for ax in axes[::ncols]:
        ax.set_ylabel("precision")
    return fig


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save ``figure`` to ``path`` atomically, in the format its suffix names (png, pdf, svg)."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path


def _cell(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def format_ap_table(res: dict, class_names=None) -> str:
    """Per-class AP (in %) for VOC07, VOC12, COCO .5:.95, COCO .5 and COCO .75, then the means.

    ``-`` marks a class without objects (left out of the means); GT counts non-difficult objects.
    """
    names = _names(res, class_names)
    width = max(len("mean"), *(len(n) for n in names))
    columns = ("voc07", "voc12", "coco", "ap50_coco", "ap75_coco")
    counts = res.get("num_ground_truths_per_class") or [None] * len(names)
    header = f"{'class':<{width}} {'GT':>6} " + " ".join(
        f"{h:>7}" for h in ("VOC07", "VOC12", "COCO", "AP50", "AP75")
    )
    lines = [header, "-" * len(header)]
    for c, name in enumerate(names):
        cells = " ".join(f"{_cell(res['per_class'][k][c]):>7}" for k in columns)
        count = "-" if counts[c] is None else str(counts[c])
        lines.append(f"{name:<{width}} {count:>6} {cells}")
    means = (res["map_voc07"], res["map_voc12"], res["map_coco"])
    means += (res["ap50_coco"], res["ap75_coco"])
    lines.append("-" * len(header))
    total = str(res.get("num_ground_truths", "-"))
    lines.append(f"{'mean':<{width}} {total:>6} " + " ".join(f"{_cell(m):>7}" for m in means))
    return "\n".join(lines)


HISTORY_PANELS = (
    ("loss_total", "loss (total)"),
    ("loss_coord", "loss coord"),
    ("loss_obj", "loss obj"),
    ("loss_noobj", "loss noobj"),
    ("loss_cls", "loss cls"),
    ("lr", "learning rate"),
    ("map_voc07", "VOC07 mAP"),
    ("map_coco", "COCO mAP .5:.95"),
)


def plot_training_history(history: list[dict]) -> Figure:
    """A training run's curves per epoch: the mean loss terms, the learning rate and the
    validation mAP (evaluated epochs only). ``history`` holds one dict per epoch with an
    ``"epoch"`` key and any of the keys of ``HISTORY_PANELS``; missing values are skipped."""
    fig = Figure(figsize=(13, 5.5))  # a fixed layout: drawn every epoch, twice as fast
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(HISTORY_PANELS) // 2).ravel()
    fig.subplots_adjust(left=0.05, right=0.99, top=0.94, bottom=0.09, wspace=0.3, hspace=0.45)
    for ax, (key, title) in zip(axes, HISTORY_PANELS, strict=True):
        points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(True, alpha=0.3)
    return fig


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright RGB colour per class index, hues spread by the golden ratio."""
    red, green, blue = colorsys.hsv_to_rgb((label * GOLDEN_RATIO_CONJUGATE) % 1.0, 0.85, 0.95)
    return round(255 * red), round(255 * green), round(255 * blue)


def _to_pil(image) -> Image.Image:
    """A PIL image (copied, RGB) from PIL or a ``[3, H, W]`` tensor (float in [0, 1] or uint8)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        pixels = image.detach().cpu()
        if pixels.is_floating_point():
            pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
    shape = getattr(image, "shape", None)
    raise TypeError(
        f"utils.visualize.draw_detections: image of type {type(image).__name__} with shape "
        f"{shape}; pass a PIL image or a [3, H, W] tensor"
    )


def _rows(boxes, name: str, min_columns: int) -> np.ndarray:
    """``[K, >= min_columns]`` tensor or array -> float64 numpy rows (empty -> ``[0, 6]``)."""
    rows = np.asarray(torch.as_tensor(boxes).detach().cpu(), dtype=np.float64)
    if rows.size == 0:
        return np.zeros((0, 6))
    if rows.ndim != 2 or rows.shape[1] < min_columns:
        raise ValueError(
            f"utils.visualize.draw_detections: {name} has shape {list(rows.shape)}; expected "
            f"[K, {min_columns}+] normalised xyxy rows (see docs/design.md)"
        )
    return rows


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def _put_label(draw: ImageDraw.ImageDraw, box, text: str, colour, font, line: int) -> None:
    """``text`` on a ``colour`` tag above the pixel ``box`` (inside its top edge at the border)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = box[0], box[1] - (bottom - top) - 2 * line
    if y < 0:
        x, y = box[0] + line, box[1] + line
    draw.rectangle((x, y, x + right - left + 2 * line, y + bottom - top + 2 * line), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((x + line - left, y + line - top), text, fill=ink, font=font)


def draw_detections(
    image,
    detections,
    class_names,
    *,
    ground_truths=None,
    score_threshold: float = 0.3,
) -> Image.Image:
    """A copy of ``image`` with detections (class colour, name and score) and ground truths.

    ``image``: PIL image or ``[3, H, W]`` tensor (float in [0, 1] or uint8). ``detections``:
    ``[K, 6]`` (x1, y1, x2, y2, score, class), normalised xyxy, tensor or array; those scoring
    below ``score_threshold`` are left out, the best are drawn last (on top). ``ground_truths``:
    ``[G, 4+]`` normalised xyxy rows, (class, difficult) after them; drawn as thin white boxes,
    difficult ones grey.
    """
    canvas = _to_pil(image)
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    scale = np.array([width, height, width, height], dtype=np.float64)
    line = max(1, round(min(width, height) / 250))
    font = _font(max(9, round(min(width, height) / 40)))

    def pixel_box(row: np.ndarray) -> tuple[float, ...]:
        x1, y1, x2, y2 = row[:4] * scale
        return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)

    if ground_truths is not None:
        for row in _rows(ground_truths, "ground_truths", 4):
            grey = len(row) > 5 and row[5] != 0
            outline = (150, 150, 150) if grey else (255, 255, 255)
            draw.rectangle(pixel_box(row), outline=outline, width=max(1, line // 2))
    rows = _rows(detections, "detections", 6)
    rows = rows[rows[:, 4] >= score_threshold]
    for row in rows[np.argsort(rows[:, 4], kind="stable")]:
        label = int(row[5])
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        box = pixel_box(row)
        draw.rectangle(box, outline=class_colour(label), width=line)
        _put_label(draw, box, f"{name} {row[4]:.2f}", class_colour(label), font, line)
    return canvas


MAX_SCATTER_POINTS = 5000
# YOLOv2 paper (arXiv 1612.08242), Table 1, "Cluster IOU" Avg IOU on VOC 2007+2012 (percent)
PAPER_CLUSTER_IOU = {5: 61.0, 9: 67.2}


def _subsample(num_points: int, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` of ``num_points``, a fixed random choice (sorted)."""
    if num_points <= max_points:
        return np.arange(num_points)
    return np.sort(np.random.default_rng(0).choice(num_points, max_points, replace=False))


def plot_anchor_clusters(
    wh,
    anchors,
    *,
    img_size: int = 416,
    max_points: int = MAX_SCATTER_POINTS,
) -> Figure:
    """Box shapes coloured by their anchor (highest IoU of centred boxes), anchors marked.

    ``wh`` ``[M, 2]`` box (width, height), fractions of the image; ``anchors`` ``[K, 2]`` in
    cells of the stride-32 grid; tensors or arrays. Drawn in pixels of an ``img_size`` square
    input (boxes ``wh * img_size``, anchors ``anchors * 32``), anchors labelled in cells. At
    most ``max_points`` boxes are drawn (a fixed random subset); the mean IoU in the title is
    over all of them.
    """
    sizes = torch.as_tensor(wh, dtype=torch.float32).detach().cpu() * img_size  # [M, 2] pixels
    cells = torch.as_tensor(anchors, dtype=torch.float32).detach().cpu()  # [K, 2]
    if sizes.ndim != 2 or sizes.shape[-1] != 2 or cells.ndim != 2 or cells.shape[-1] != 2:
        raise ValueError(
            f"utils.visualize.plot_anchor_clusters: wh {list(sizes.shape)} and anchors "
            f"{list(cells.shape)} must both be [N, 2] (width, height)"
        )
    centres = cells * STRIDE  # [K, 2] pixels
    best_iou, cluster = wh_iou(sizes[:, None], centres[None]).max(dim=1)  # [M] each
    shown = _subsample(len(sizes), max_points)
    colours = np.array([class_colour(c) for c in range(len(centres))]) / 255.0  # [K, 3]
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    points = sizes[shown].numpy()  # [S, 2]
    point_colours = colours[cluster[shown].numpy()]  # [S, 3]
    ax.scatter(*points.T, s=3, c=point_colours, alpha=0.35, linewidths=0, rasterized=True)
    ax.scatter(*centres.numpy().T, s=140, c=colours, marker="X", edgecolors="black", zorder=3)
    for (width, height), position in zip(cells.tolist(), centres.tolist(), strict=True):
        label = f"{width:.2f}x{height:.2f}"
        ax.annotate(label, position, xytext=(6, 6), textcoords="offset points", fontsize=8)
    limit = 1.02 * max(img_size, float(centres.max()))
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_aspect("equal")
    ax.set_xlabel(f"box width (pixels of a {img_size}x{img_size} input)")
    ax.set_ylabel(f"box height (pixels of a {img_size}x{img_size} input)")
    ax.set_title(
        f"k = {len(centres)}: mean IoU {100 * best_iou.mean().item():.2f}% over {len(sizes)} "
        f"boxes (anchors in cells of 32 px)",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    return fig


def plot_iou_vs_k(ious: dict[int, float]) -> Figure:
    """Mean IoU (``{k: fraction in [0, 1]}``) against the number of anchors k, in percent,
    with the YOLOv2 paper's "Cluster IOU" points (61.0 at k = 5, 67.2 at k = 9) for reference."""
    if not ious:
        raise ValueError("utils.visualize.plot_iou_vs_k: no results to plot; pass {k: mean IoU}")
    ks = sorted(ious)
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(ks, [100 * ious[k] for k in ks], marker="o", lw=1.2, label="k-means (this run)")
    paper_ks = sorted(PAPER_CLUSTER_IOU)
    paper_ious = [PAPER_CLUSTER_IOU[k] for k in paper_ks]
    label = "YOLOv2 paper, VOC 07+12 (Table 1)"
    ax.scatter(paper_ks, paper_ious, marker="*", s=160, c="tab:red", zorder=3, label=label)
    ax.set_xlabel("number of anchors k")
    ax.set_ylabel("mean IoU with the nearest anchor (%)")
    ax.set_xticks(sorted(set(ks) | set(paper_ks)))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig
