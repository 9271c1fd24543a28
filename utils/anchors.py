"""Anchor boxes (dimension priors): darknet's defaults, JSON files, and the box sizes of a
VOC-format dataset that k-means (:mod:`utils.kmeans`) clusters.

Anchors are a float32 tensor ``[A, 2]`` of (width, height) in cells of the output grid
(stride 32), darknet's ``anchors=`` numbers: fixed in pixels (x32), the same at every input
size. An anchor file is a JSON object ``{"unit": "grid", "stride": 32, "anchors": [[w, h],
...], ...}`` (more keys allowed). Legacy files, a JSON list of ``{"width": w, "height":
h}`` fractions of a 416 image, still load: multiplied by 13 (416 / 32), with a warning.
"""

import json
import logging
import math
import os
from pathlib import Path

import torch

from utils.data import VOCDataset
from utils.fileio import atomic_write_text

__all__ = [
    "DARKNET_VOC_ANCHORS_GRID",
    "STRIDE",
    "anchors_for_size",
    "anchors_img_size",
    "default_anchors",
    "load_anchors",
    "read_voc_box_sizes",
    "save_anchors",
]

logger = logging.getLogger(__name__)

# darknet cfg/yolov2-voc.cfg [region] anchors, in cells of the output grid
DARKNET_VOC_ANCHORS_GRID = (
    (1.3221, 1.73145),
    (3.19275, 4.00944),
    (5.05587, 8.09892),
    (9.47112, 4.84053),
    (11.2364, 10.0071),
)
STRIDE = 32  # input pixels per grid cell
SEED_GRID_SIZE = 13  # legacy anchor files are fractions of a 416 image: 13 cells
FORMAT_HINT = '{"unit": "grid", "stride": 32, "anchors": [[w, h], ...]} (w, h in grid cells)'


def default_anchors() -> torch.Tensor:
    """darknet's yolov2-voc anchors in grid cells: float32 ``[5, 2]`` (w, h)."""
    return torch.tensor(DARKNET_VOC_ANCHORS_GRID, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# JSON files


def load_anchors(path: str | os.PathLike) -> torch.Tensor:
    """Read an anchor JSON file -> float32 ``[A, 2]`` (w, h) in grid cells. A file of the
    legacy format (fractions of a 416 image) is converted (x13) with one warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"anchor file {path} does not exist: give a JSON file written by kmeans.py, "
            f"{FORMAT_HINT}"
        )
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        message = f"anchor file {path} is not valid JSON ({err}): write {FORMAT_HINT}"
        raise ValueError(message) from None
    if isinstance(document, list) and document and all(isinstance(e, dict) for e in document):
        return _read_seed_format(document, path)
    if not isinstance(document, dict):
        raise ValueError(
            f"anchor file {path} holds {type(document).__name__} {document!r:.60}: expected "
            f"{FORMAT_HINT}"
        )
    missing = sorted({"unit", "stride", "anchors"} - set(document))
    if missing:
        raise ValueError(f"anchor file {path} lacks the keys {missing}: expected {FORMAT_HINT}")
    if document["unit"] != "grid":
        raise ValueError(
            f"anchor file {path}: unit {document['unit']!r} is not known; the unit is 'grid' "
            "(cells of the stride-32 output grid: pixels at the input size / 32)"
        )
    if document["stride"] != STRIDE:
        raise ValueError(
            f"anchor file {path}: stride {document['stride']!r}, but the model's output grid "
            f"has stride {STRIDE}: give the anchors in cells of {STRIDE} pixels"
        )
    return _anchor_tensor(document["anchors"], path)


def _anchor_tensor(pairs: object, path: Path) -> torch.Tensor:
    """``[[w, h], ...]`` of positive finite numbers -> float32 ``[A, 2]``, else a ValueError."""
    if not isinstance(pairs, list) or not pairs:
        raise ValueError(
            f"anchor file {path}: 'anchors' is {pairs!r:.60}, expected a non-empty list "
            "[[w, h], ...] in grid cells"
        )
    for index, pair in enumerate(pairs):
        numbers = isinstance(pair, list) and len(pair) == 2 and all(_is_size(v) for v in pair)
        if not numbers:
            raise ValueError(
                f"anchor file {path}: anchor {index} is {pair!r:.60}; each anchor must be "
                "[w, h], two finite positive numbers of grid cells"
            )
    return torch.tensor(pairs, dtype=torch.float32)


def _is_size(value: object) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def _read_seed_format(entries: list[dict], path: Path) -> torch.Tensor:
    """The legacy ``[{"width": w, "height": h}, ...]`` (fractions of a 416 image) -> grid cells."""
    for index, entry in enumerate(entries):
        if set(entry) != {"width", "height"}:
            raise ValueError(
                f"anchor file {path}, entry {index} is {entry!r:.60}: the old format needs "
                f"exactly the keys 'width' and 'height'; better, write {FORMAT_HINT}"
            )
        for key in ("width", "height"):
            if not (_is_size(entry[key]) and entry[key] <= 1):
                raise ValueError(
                    f"anchor file {path}, entry {index}: {key} = {entry[key]!r} is not a "
                    f"fraction of the image in (0, 1]; for grid cells write {FORMAT_HINT}"
                )
    fractions = torch.tensor([[e["width"], e["height"]] for e in entries], dtype=torch.float64)
    anchors = (fractions * SEED_GRID_SIZE).float()  # [A, 2]
    rewritten = json.dumps({"unit": "grid", "stride": STRIDE, "anchors": _rounded(anchors)})
    logger.warning(
        "anchor file %s is in the old format (fractions of a 416 image): read as grid cells, "
        "x%d; to silence this, run kmeans.py again or replace its content with %s",
        path,
        SEED_GRID_SIZE,
        rewritten,
    )
    return anchors


def _rounded(anchors: torch.Tensor) -> list[list[float]]:
    """``[A, 2]`` -> nested lists with 6 significant digits (float32 holds about 7)."""
    return [[float(f"{value:.6g}") for value in pair] for pair in anchors.tolist()]


def save_anchors(anchors_grid: torch.Tensor, path: str | os.PathLike, **extra) -> None:
    """Write ``[A, 2]`` (w, h) anchors in grid cells as the JSON object of an anchor file,
    atomically; ``extra`` adds JSON-able keys (e.g. ``img_size``, ``mean_iou``)."""
    if anchors_grid.ndim != 2 or anchors_grid.shape[1] != 2 or anchors_grid.shape[0] == 0:
        raise ValueError(
            f"anchors must have shape [A, 2] with A >= 1, got {tuple(anchors_grid.shape)}"
        )
    if not bool((torch.isfinite(anchors_grid) & (anchors_grid > 0)).all()):
        raise ValueError(f"anchors must be finite and positive grid cells, got {anchors_grid}")
    reserved = sorted({"unit", "stride", "anchors"} & set(extra))
    if reserved:
        raise ValueError(f"save_anchors writes the keys {reserved} itself: rename the extra keys")
    document = {"unit": "grid", "stride": STRIDE, "anchors": anchors_grid.tolist(), **extra}
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in document.items()]
    atomic_write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")  # a key per line


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


# ---------------------------------------------------------------------------------------------
# The input size an anchor file was fitted at


def anchors_img_size(path: str | os.PathLike) -> int | None:
    """The ``img_size`` an anchor file records (kmeans.py writes the size whose grid cells its
    anchors are in), or None (darknet's numbers, a hand-written or legacy file)."""
    document = json.loads(Path(path).read_text())
    size = document.get("img_size") if isinstance(document, dict) else None
    return size if isinstance(size, int) and size > 0 and size % STRIDE == 0 else None


def anchors_for_size(
    anchors: torch.Tensor, fitted: int, img_size: int, *, scale: bool
) -> tuple[torch.Tensor, str]:
    """Anchors ``[A, 2]`` in cells of the grid at ``fitted`` pixels, for a model evaluated at
    ``img_size``, and one line saying what was done. ``scale``: x ``img_size / fitted`` (grid
    cells at the new size), so each anchor covers the share of the image it was fitted to;
    else the cells as they are (darknet's way: fixed in pixels x32), each anchor then covering
    ``fitted / img_size`` times that share."""
    cells, fitted_cells = img_size // STRIDE, fitted // STRIDE
    if scale:
        line = (
            f"scaled x{cells}/{fitted_cells} from the {fitted_cells}-cell grid of --img-size "
            f"{fitted} to the {cells}-cell grid of {img_size}, to cover the same share of the "
            "image"
        )
        return anchors * (cells / fitted_cells), line
    line = (
        f"fitted at --img-size {fitted} ({fitted_cells} cells) but used at {img_size} ({cells} "
        f"cells): each covers {fitted / img_size:.2f}x the boxes it was fitted to (kept, as "
        f"darknet keeps anchors in pixels; --scale-anchors scales them x{cells}/{fitted_cells})"
    )
    return anchors, line
