"""Detections written in the formats other tools score: Pascal VOC's devkit result files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils.fileio import atomic_write_text
from utils.voc import boxes_to_voc_pixels


def write_voc_results(records: list, classes: tuple[str, ...], out_dir: str | Path) -> None:
    """VOC result files ``comp4_det_test_<class>.txt``: ``image_id score x1 y1 x2 y2``.

    ``records``: ``(image_id, (height, width), detections [K, 6])`` with normalised xyxy boxes.
    Boxes are written in the VOC pixel frame of the original image, ``(x1 W + 1, y1 H + 1,
    x2 W, y2 H)`` to 0.01 pixel (the inverse of the loader's mapping, so the devkit's +1 IoU
    is ours); scores in the shortest form that reads back to the same value, so that the
    devkit's stable sort sees the order and the ties the evaluator saw. Lines keep the order
    of ``records``, then of rows.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {c: [] for c in range(len(classes))}
    for image_id, (height, width), dets in records:
        dets = torch.as_tensor(dets).detach().cpu()
        dtype = torch.float64 if dets.dtype == torch.float64 else torch.float32
        corners = boxes_to_voc_pixels(dets[:, :4].double(), width, height).tolist()  # [K, 4]
        scores = dets[:, 4].to(dtype).numpy()
        for (x1, y1, x2, y2), score, label in zip(
            corners, scores, dets[:, 5].tolist(), strict=True
        ):
            text = np.format_float_positional(score, trim="-")
            lines[int(label)].append(f"{image_id} {text} {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}")
    for label, name in enumerate(classes):
        atomic_write_text(
            out_dir / f"comp4_det_test_{name}.txt", "".join(f"{x}\n" for x in lines[label])
        )
