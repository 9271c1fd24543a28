"""COCO instances JSON (``instances_*.json``) -> :class:`utils.records.FlatRecords`.

A COCO ``bbox`` ``[x, y, w, h]`` is in continuous pixels of a W x H image (the JSON's
``width``/``height``), so its normalised box is ``(x / W, y / H, (x + w) / W, (y + h) / H)``.
Category ids (COCO's run 1..90 with gaps) map to contiguous labels in sorted id order, or, with
a class list, by name. ``iscrowd`` objects are crowd regions, kept apart from the boxes.

Bad input, each counted per kind and logged once with an example (:class:`SkipLog`): an
annotation of an unknown ``image_id`` or ``category_id``, a malformed or empty bbox, a box fully
outside its image (dropped) or partly outside (clamped), a repeated image or annotation id (the
first kept), an image without a file, a ``file_name`` leaving the image folder. A file that is
not JSON or not an instances file is one error naming it and what to give.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from utils.records import FlatDetectionDataset, SkipLog, pack_records

__all__ = ["BadDataset", "CocoDataset", "coco_image_dir", "read_coco_json", "scan_coco"]

log = logging.getLogger(__name__)


class BadDataset(ValueError):
    """The file is not a dataset of the format it was read as; the message says what to give."""


def read_coco_json(path: str | os.PathLike) -> dict:
    """The JSON document of an instances file, checked to hold ``images`` and ``annotations``
    lists and a ``categories`` list; raises BadDataset naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} not found: give instances_*.json")
    try:
        with open(path, "rb") as handle:
            document = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadDataset(
            f"{path} is not valid JSON ({error}): give a COCO instances_*.json"
        ) from None
    keys = ("images", "annotations", "categories")
    if not isinstance(document, dict) or not all(
        isinstance(document.get(key), list) for key in keys
    ):
        found = sorted(document)[:6] if isinstance(document, dict) else type(document).__name__
        raise BadDataset(
            f"{path} is JSON but not a COCO instances file (needs lists {', '.join(keys)}; "
            f"found {found}): give an instances_*.json with boxes"
        )
    return document


def coco_image_dir(annotation_file: str | os.PathLike) -> Path:
    """The image folder of an instances file by COCO's layout: ``ROOT/annotations/
    instances_S.json`` -> ``ROOT/S`` (else ``ROOT/images/S``, else ``ROOT/images``); a JSON
    elsewhere -> its own folder's ``images`` (else the folder itself)."""
    path = Path(annotation_file)
    split = path.stem.removeprefix("instances_")
    parent = path.parent
    root = parent.parent if parent.name == "annotations" else parent
    for candidate in (root / split, root / "images" / split, root / "images"):
        if candidate.is_dir():
            return candidate
    return root


def _categories(document: dict, path, classes) -> tuple[dict, tuple, np.ndarray, dict]:
    """``{category_id: label}``, class names, ``[C]`` label -> category id (-1 if absent) and
    every category's name ``{category_id: name}``."""
    names: dict[int, str] = {}
    for cat in document["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise BadDataset(f"{path}: category {cat!r} has no integer id: fix the categories")
        if cat["id"] in names:
            raise BadDataset(f"{path}: category id {cat['id']} appears twice: keep one")
        names[cat["id"]] = str(cat.get("name", cat["id"]))
    ids = sorted(names)
    if classes is None:
        classes = tuple(names[i] for i in ids)
        mapping = {cid: label for label, cid in enumerate(ids)}
        return mapping, classes, np.array(ids, np.int64), names
    index = {name: label for label, name in enumerate(classes)}
    mapping = {cid: index[names[cid]] for cid in ids if names[cid] in index}
    back = np.full(len(classes), -1, np.int64)
    for cid, label in mapping.items():
        back[label] = cid
    return mapping, tuple(classes), back, names


def _images(document, path, image_dir: Path, skips: SkipLog, keep_missing: bool):
    """``{image_id: index}``, file paths, ids, sizes ``[N, 2]`` (height, width)."""
    present = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
    folder = str(image_dir)
    index, paths, ids, sizes = {}, [], [], []
    for image in document["images"]:
        try:
            image_id, name = image["id"], str(image["file_name"])
            width, height = int(image["width"]), int(image["height"])
            assert isinstance(image_id, int) and width > 0 and height > 0
        except (KeyError, TypeError, ValueError, AssertionError):
            skips.add("image entries without id, file_name, width or height", path, repr(image))
            continue
        if image_id in index:
            skips.add("repeated image ids (first kept)", path, f"id {image_id}")
            continue
        nested = "/" in name or "\\" in name
        if nested and (os.path.isabs(name) or ".." in Path(name).parts):
            skips.add("file_name outside the image folder", path, name)
            continue
        exists = (image_dir / name).is_file() if nested else name in present
        if not exists and not keep_missing:
            skips.add("images without a file", image_dir / name)
            continue
        index[image_id] = len(paths)
        paths.append(os.path.join(folder, name))
        ids.append(image_id)
        sizes.append((height, width))
    return index, paths, np.array(ids, np.int64), np.array(sizes, np.int64).reshape(-1, 2)


def _annotation_rows(document, path, image_index, category_map, names, skips: SkipLog):
    """Columns of the usable annotations: owner, category label, bbox ``[M, 4]``, area, crowd."""
    owner, label, bbox, area, crowd, seen = [], [], [], [], [], set()
    for ann in document["annotations"]:
        try:
            ann_id, image_id, cid = ann.get("id"), ann["image_id"], ann["category_id"]
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError, AttributeError):
            skips.add("annotations without image_id, category_id or a 4-number bbox", path,
                      repr(ann)[:120])  # fmt: skip
            continue
        if ann_id is not None:
            if ann_id in seen:
                skips.add("repeated annotation ids (first kept)", path, f"id {ann_id}")
                continue
            seen.add(ann_id)
        if image_id not in image_index:
            skips.add("annotations of an image_id with no usable image", path, f"{image_id}")
            continue
        if cid not in category_map:
            if cid in names:
                skips.unknown_classes[names[cid]] += 1
            skips.add("annotations of an unknown or unlisted category_id", path, f"{cid}")
            continue
        if not (w > 0 and h > 0):  # NaN too; infinities are caught by the caller
            skips.add("boxes with a non-positive or non-finite size, dropped", path, f"{ann_id}")
            continue
        owner.append(image_index[image_id])
        label.append(category_map[cid])
        bbox.append((x, y, w, h))
        area.append(float(ann.get("area") or w * h))
        crowd.append(bool(ann.get("iscrowd", 0)))
    return (np.array(owner, np.int64), np.array(label, np.int64),
            np.array(bbox, np.float64).reshape(-1, 4), np.array(area, np.float64),
            np.array(crowd, bool))  # fmt: skip


def _normalise(bbox: np.ndarray, sizes: np.ndarray, path, skips: SkipLog):
    """``[M, 4]`` pixels xywh -> normalised xyxy clamped to [0, 1] and the rows kept."""
    finite = np.isfinite(bbox).all(axis=1)
    if not finite.all():
        skips.add("boxes with a non-positive or non-finite size, dropped", path,
                  f"{bbox[~finite][0].tolist()}", count=int((~finite).sum()))  # fmt: skip
        bbox = np.where(finite[:, None], bbox, -1.0)  # fully outside: dropped below, uncounted
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    span = np.stack([bbox[:, 0], bbox[:, 1], bbox[:, 0] + bbox[:, 2], bbox[:, 1] + bbox[:, 3]], 1)
    limits = np.stack([width, height, width, height], 1)  # [M, 4]
    clamped = np.clip(span, 0.0, limits)
    keep = (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])
    outside = ~keep & finite
    if outside.any():
        skips.add("boxes fully outside their image, dropped", path,
                  f"{span[outside][0].tolist()}", count=int(outside.sum()))  # fmt: skip
    moved = keep & (clamped != span).any(axis=1)
    if moved.any():
        skips.add("boxes partly outside their image, clamped", path, count=int(moved.sum()))
    return (clamped / limits).astype(np.float32), keep


def scan_coco(annotation_file, image_dir, classes=None, *, keep_missing: bool = False):
    """``(records, classes, category_ids, skips)`` of one instances file (module docstring).
    ``keep_missing`` keeps images whose file is absent (evaluation: their objects are misses)."""
    path, image_dir = Path(annotation_file), Path(image_dir)
    document = read_coco_json(path)
    skips = SkipLog()
    category_map, classes, category_ids, names = _categories(document, path, classes)
    image_index, paths, ids, sizes = _images(document, path, image_dir, skips, keep_missing)
    owner, label, bbox, area, crowd = _annotation_rows(
        document, path, image_index, category_map, names, skips
    )
    del document  # the parsed JSON is the bulk of the memory: free it before packing
    boxes, keep = _normalise(bbox, sizes[owner], path, skips)
    plain, crowded = keep & ~crowd, keep & crowd
    records = pack_records(
        paths, ids, sizes, owner[plain], boxes[plain], label[plain], area[plain],
        owner[crowded], boxes[crowded], label[crowded],
    )  # fmt: skip
    return records, classes, category_ids, skips


class CocoDataset(FlatDetectionDataset):
    """A COCO instances file and its image folder (module docstring); ``ds[i]`` as
    :class:`utils.records.FlatDetectionDataset` with the JSON's int ``image_id``.
    ``ds.classes`` are the names in label order, ``ds.category_ids`` ``[C]`` the category id of
    each label (for writing results; -1 for a listed class the JSON lacks). ``classes`` picks and
    orders the categories by name; ``keep_unreadable`` keeps images without a file (evaluation)."""

    def __init__(self, annotation_file, image_dir=None, transform=None, *, classes=None,
                 keep_unreadable: bool = False):  # fmt: skip
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir) if image_dir else coco_image_dir(annotation_file)
        records, names, self.category_ids, skips = scan_coco(
            self.annotation_file, self.image_dir, classes, keep_missing=keep_unreadable
        )
        super().__init__(records, names, skips, where=str(self.annotation_file),
                         transform=transform, keep_unreadable=keep_unreadable)  # fmt: skip

    def summary(self) -> str:
        crowd = len(self.records.crowd_labels)
        text = (f"{len(self)} images, {self.num_objects} objects (+{crowd} crowd regions) from "
                f"{self.where}, images in {self.image_dir}")  # fmt: skip
        return text + "".join(f"; {line}" for line in self.skips.lines())
