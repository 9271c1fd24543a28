"""Checks and conversions of what ``DetectionEvaluator.update`` is given, one batch at a time.

Per image: detections ``[K, 6]`` (x1, y1, x2, y2, score, class), ground truths ``[G, 6]`` (x1,
y1, x2, y2, class, difficult), normalised xyxy, torch tensors on any device or numpy arrays;
optionally the image size (height, width) in pixels, the ground truths' areas ``[G]`` in
pixels² and crowd regions ``[K, 4]`` normalised xyxy with their classes ``[K]``.
"""

import math

import numpy as np
import torch

__all__ = ["check_rows", "crowd_rows", "gt_areas_px", "image_sizes_px", "stack_rows"]

_FORMATS = {
    "detections": "(x1, y1, x2, y2, score, class)",
    "ground_truths": "(x1, y1, x2, y2, class, difficult)",
    "crowd_boxes": "(x1, y1, x2, y2)",
}


def _error(text: str) -> ValueError:
    return ValueError(f"DetectionEvaluator.update: {text}")


def stack_rows(items, kind: str, width: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ``[K_i, width]`` tensors/arrays -> (rows ``[sum K_i, width]``, counts ``[N]``).

    Rows stay float32 when every input is float32 (exact, half the memory of float64 for the
    many detections of an untrained model), float64 otherwise.
    """
    shapes = [tuple(item.shape) for item in items]
    for i, shape in enumerate(shapes):
        if not (len(shape) == 2 and shape[1] == width) and math.prod(shape) != 0:
            raise _error(
                f"{kind}[{i}] has shape {list(shape)}; expected [K, {width}] rows "
                f"{_FORMATS[kind]} in normalised [0, 1] coordinates, or an empty tensor for none"
            )
    counts = np.array([0 if math.prod(s) == 0 else s[0] for s in shapes], dtype=np.int64)
    if len(items) == 0 or counts.sum() == 0:
        return np.zeros((0, width), np.float32), counts
    tensors = [torch.as_tensor(item).detach().reshape(-1, width) for item in items]  # [K_i, w]
    if len({t.device for t in tensors}) > 1:
        tensors = [t.cpu() for t in tensors]
    rows = torch.cat(tensors)  # one copy to the host per batch
    dtype = torch.float32 if rows.dtype == torch.float32 else torch.float64
    return rows.to("cpu", dtype).numpy(), counts


def check_rows(rows: np.ndarray, class_column: int, num_classes: int, kind: str) -> None:
    """Fail loudly on non-finite values, inverted boxes or classes outside ``[0, num_classes)``."""
    if not np.isfinite(rows).all():
        raise _error(f"{kind} contain NaN or inf; drop those rows")
    inverted = (rows[:, 2] < rows[:, 0]) | (rows[:, 3] < rows[:, 1])
    if inverted.any():
        raise _error(
            f"{kind} box {rows[inverted][0, :4].tolist()} has x2 < x1 or y2 < y1; boxes are "
            f"(x1, y1, x2, y2) with x1 <= x2 and y1 <= y2"
        )
    labels = rows[:, class_column]
    bad = (labels < 0) | (labels >= num_classes) | (labels != np.round(labels))
    if bad.any():
        raise _error(
            f"{kind} class {float(labels[bad][0])} is not an integer in [0, {num_classes}); "
            f"pass 0-based class indices below num_classes={num_classes}"
        )


def image_sizes_px(image_sizes, num_images: int) -> np.ndarray:
    """``image_sizes`` (one (height, width) per image, or None) -> ``[N, 2]`` float64, NaN for
    unknown."""
    if image_sizes is None:
        return np.full((num_images, 2), np.nan)
    sizes = [[float(v) for v in torch.as_tensor(s).reshape(-1).tolist()] for s in image_sizes]
    if len(sizes) != num_images or any(len(s) != 2 or min(s) <= 0 for s in sizes):
        raise _error(
            f"image_sizes must hold one positive (height, width) per image, {num_images} in "
            f"all; got {len(sizes)} entries, first {sizes[:1]}"
        )
    sizes = np.array(sizes, dtype=np.float64).reshape(num_images, 2)
    if not np.isfinite(sizes).all():
        raise _error("image_sizes hold NaN or inf; pass each image's (height, width) in pixels")
    return sizes


def gt_areas_px(gt_areas, gt_rows, gt_counts, sizes) -> np.ndarray:
    """Ground-truth areas ``[G]`` float64 in pixels²: ``gt_areas`` (one ``[G_i]`` per image) if
    given, else the pixel box's ``w h``, ``((x2 - x1) W) ((y2 - y1) H)``; NaN where unknown."""
    if gt_areas is None:
        size = np.repeat(sizes, gt_counts, axis=0)  # [G, 2] (height, width)
        rows = gt_rows.astype(np.float64)
        return ((rows[:, 2] - rows[:, 0]) * size[:, 1]) * ((rows[:, 3] - rows[:, 1]) * size[:, 0])
    areas = [torch.as_tensor(a).detach().cpu().double().reshape(-1).numpy() for a in gt_areas]
    given = np.array([len(a) for a in areas])
    if len(areas) != len(gt_counts) or (given != gt_counts).any():
        raise _error(
            f"gt_areas must hold one [G] array per image matching its ground truths "
            f"({gt_counts.tolist()[:8]} rows); got lengths {given.tolist()[:8]}"
        )
    merged = np.concatenate([np.zeros(0), *areas])
    if not (np.isfinite(merged).all() and (merged >= 0).all()):
        raise _error("gt_areas hold a negative, NaN or inf area; areas are pixels² >= 0")
    return merged


def crowd_rows(crowd_boxes, crowd_labels, num_images: int, num_classes: int):
    """Crowd regions -> (ground-truth rows ``[K, 6]`` with difficult = 1, counts ``[N]``)."""
    if crowd_boxes is None and crowd_labels is None:
        return np.zeros((0, 6)), np.zeros(num_images, np.int64)
    if crowd_boxes is None or crowd_labels is None or len(crowd_boxes) != num_images:
        raise _error("crowd_boxes and crowd_labels go together, one [K, 4] and one [K] per image")
    boxes, counts = stack_rows(list(crowd_boxes), "crowd_boxes", 4)
    labels = [torch.as_tensor(x).detach().cpu().double().reshape(-1) for x in crowd_labels]
    if len(labels) != num_images or [len(x) for x in labels] != counts.tolist():
        raise _error("crowd_labels must hold one class per crowd box, one [K] per image")
    label_column = torch.cat([torch.zeros(0, dtype=torch.float64), *labels]).numpy()
    rows = np.column_stack([boxes.astype(np.float64), label_column, np.ones(len(boxes))])
    check_rows(rows.reshape(-1, 6), 4, num_classes, "crowd_boxes")
    return rows.reshape(-1, 6), counts
