"""Anchor boxes (dimension priors): darknet's defaults, JSON files, and the box sizes of a
VOC-format dataset that k-means (:mod:`utils.kmeans`) clusters.

Anchors are a float tensor ``[A, 2]`` of (width, height) as fractions of the image. The files
are the seed's format: a JSON list of ``{"width": w, "height": h}``.
"""

import json
import logging
import os
from pathlib import Path

import torch

from utils.data import VOCDataset
from utils.fileio import atomic_write_text

__all__ = [
    "DARKNET_VOC_ANCHORS_GRID",
    "default_anchors",
    "load_anchors",
    "read_voc_box_sizes",
    "save_anchors",
]

logger = logging.getLogger(__name__)

# darknet cfg/yolov2-voc.cfg [region] anchors, in units of the 13x13 output grid
DARKNET_VOC_ANCHORS_GRID = (
    (1.3221, 1.73145),
    (3.19275, 4.00944),
    (5.05587, 8.09892),
    (9.47112, 4.84053),
    (11.2364, 10.0071),
)
_DARKNET_GRID_SIZE = 13


def default_anchors() -> torch.Tensor:
    """darknet's yolov2-voc anchors as fractions of the image: float32 ``[5, 2]`` (w, h)."""
    return torch.tensor(DARKNET_VOC_ANCHORS_GRID, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# JSON files


def load_anchors(path: str | os.PathLike) -> torch.Tensor:
    """Read an anchor JSON file -> float32 ``[A, 2]`` (w, h), fractions of the image in (0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"anchor file {path} does not exist: give the path of a JSON file written by "
            "kmeans.py (a list of {'width': w, 'height': h})"
        )
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"anchor file {path} is not valid JSON ({err}): regenerate it") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"anchor file {path} holds {type(entries).__name__} {entries!r:.80}: expected a "
            "non-empty list of {'width': w, 'height': h}"
        )
    pairs = [_parse_anchor_entry(entry, index, path) for index, entry in enumerate(entries)]
    return torch.tensor(pairs, dtype=torch.float32)


def _parse_anchor_entry(entry: object, index: int, path: Path) -> tuple[float, float]:
    if not isinstance(entry, dict) or set(entry) != {"width", "height"}:
        raise ValueError(
            f"anchor file {path}, entry {index} is {entry!r:.80}: expected exactly the keys "
            "'width' and 'height'"
        )
    pair = []
    for key in ("width", "height"):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(
                f"anchor file {path}, entry {index}: {key} = {value!r} is not a fraction of the "
                "image in (0, 1]; divide grid-unit anchors by the grid size (e.g. 13)"
            )
        pair.append(float(value))
    return pair[0], pair[1]


def save_anchors(anchors: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``[A, 2]`` (w, h) anchors (fractions of the image) as JSON, atomically."""
    if anchors.ndim != 2 or anchors.shape[1] != 2 or anchors.shape[0] == 0:
        raise ValueError(f"anchors must have shape [A, 2] with A >= 1, got {tuple(anchors.shape)}")
    if not bool(((anchors > 0) & (anchors <= 1)).all()):
        raise ValueError(f"anchors must be fractions of the image in (0, 1], got {anchors}")
    entries = [{"width": float(w), "height": float(h)} for w, h in anchors.tolist()]
    atomic_write_text(path, json.dumps(entries, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Box sizes from a VOC-format dataset


def read_voc_box_sizes(
    root: str | os.PathLike,
    sets: list[tuple[str, str]],
    classes: list[str] | tuple[str, ...],
    *,
    keep_difficult: bool = False,
    strict: bool = False,
) -> torch.Tensor:
    """Widths and heights of the boxes a :class:`utils.data.VOCDataset` of these sets trains on.

    A set ``("2007", "trainval")`` reads ``<root>/VOC2007/ImageSets/Main/trainval.txt`` and the
    listed annotations and image headers, through the dataset's own scan, so the boxes are
    exactly the training targets before augmentation: difficult boxes left out unless
    ``keep_difficult`` (as darknet's ``voc_label.py``), boxes clamped to the image, degenerate
    boxes dropped, the image header's size, unusable files and objects of classes not in
    ``classes`` skipped and reported (``strict``: ValueError on an unknown class).

    Returns float32 ``[M, 2]`` (w, h), fractions of the image.
    """
    for name, split in sets:
        set_file = Path(root) / f"VOC{name}" / "ImageSets" / "Main" / f"{split}.txt"
        if not set_file.is_file():
            raise FileNotFoundError(
                f"image list {set_file} does not exist: check --data-root ({root}) and the set "
                f"{name}:{split} (expected <root>/VOC<name>/ImageSets/Main/<split>.txt)"
            )
    dataset = VOCDataset(root, sets, classes, keep_difficult=keep_difficult, strict=strict)
    logger.info("boxes of %s", dataset.summary())
    boxes = torch.cat([torch.from_numpy(record.boxes) for record in dataset.records])  # [M, 4]
    wh = boxes[:, 2:] - boxes[:, :2]  # [M, 2] float32, as the training targets' (w, h)
    if not len(wh):
        hint = (
            "pass the dataset's classes with --classes FILE"
            if dataset.unknown_classes
            else "check the dataset"
        )
        raise ValueError(f"no boxes found under {root} for sets {sets}: {hint}")
    return wh
