"""Flat records of a detection dataset and the dataset class that serves them.

A COCO or YOLO-txt dataset can hold 100k+ images and a million boxes. Python objects per image
(lists, dicts, tuples) are touched by reference counting whenever they are read, so each forked
DataLoader worker ends up with its own copy of every page they live on (copy-on-read). The
records here are a handful of numpy arrays instead, never written after the scan, so the
workers share the parent's pages:

- ``paths`` ``[N]`` bytes (``os.fsencode`` of each image path), ``image_ids`` ``[N]`` (int64 or
  str), ``sizes`` ``[N, 2]`` int32 ``(height, width)`` (0 where only the image header knows);
- ``offsets`` ``[N + 1]`` int64 into ``boxes`` ``[M, 4]`` float32 normalised xyxy, ``labels``
  ``[M]`` int64 and ``areas`` ``[M]`` float32 (pixels², as the annotation gives it);
- ``crowd_offsets`` ``[N + 1]`` into ``crowd_boxes`` ``[K, 4]`` and ``crowd_labels`` ``[K]``.

Bad input found by a scan is counted per kind (:class:`SkipLog`): one log line per kind with its
count and a first example file, never one line per object.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.images import UnreadableImage, load_rgb, probe_image
from utils.transforms import apply_seeded

__all__ = ["FlatDetectionDataset", "FlatRecords", "SkipLog", "pack_records"]

log = logging.getLogger(__name__)

_GREY = (128, 128, 128)
_UNKNOWN_SIZE = (416, 416)  # (height, width) of the grey stand-in of a headerless image


class SkipLog:
    """Counts of skipped things per kind, each with its first example ``(file, detail)``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.unknown_classes: Counter[str] = Counter()  # objects of names not in the class list
        self.examples: dict[str, tuple[str, str]] = {}

    def add(self, kind: str, file, detail: str = "", count: int = 1) -> None:
        self.counts[kind] += count
        self.examples.setdefault(kind, (str(file), detail))

    def lines(self) -> list[str]:
        """One line per kind: ``kind: N (e.g. FILE: detail)``."""
        out = []
        for kind, count in self.counts.items():
            file, detail = self.examples[kind]
            out.append(f"{kind}: {count} (e.g. {file}{': ' + detail if detail else ''})")
        return out

    def log(self, where: str) -> None:
        for line in self.lines():
            log.warning("%s: %s", where, line)


@dataclass(frozen=True)
class FlatRecords:
    """The arrays of the module docstring; one row per image kept."""

    paths: np.ndarray
    image_ids: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    crowd_offsets: np.ndarray
    crowd_boxes: np.ndarray
    crowd_labels: np.ndarray


def _group(owner: np.ndarray, num_images: int, *columns: np.ndarray):
    """Rows sorted by ``owner`` (stable) and the ``[N + 1]`` offsets of each image's rows."""
    owner = np.asarray(owner, np.int64).reshape(-1)
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=num_images)
    offsets = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, [np.asarray(column)[order] for column in columns]


def pack_records(
    paths, image_ids, sizes, owner, boxes, labels, areas, crowd_owner, crowd_boxes, crowd_labels
) -> FlatRecords:
    """Flat records from per-object rows: ``owner`` ``[M]`` is each box's image index."""
    num = len(paths)
    offsets, (boxes, labels, areas) = _group(np.asarray(owner, np.int64), num, boxes, labels, areas)
    crowd_offsets, (crowd_boxes, crowd_labels) = _group(
        np.asarray(crowd_owner, np.int64), num, crowd_boxes, crowd_labels
    )
    return FlatRecords(
        paths=np.array([os.fsencode(str(p)) for p in paths], dtype=np.bytes_).reshape(num),
        image_ids=np.asarray(image_ids).reshape(num),
        sizes=np.asarray(sizes, dtype=np.int32).reshape(num, 2),
        offsets=offsets,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64).reshape(-1),
        areas=np.asarray(areas, np.float32).reshape(-1),
        crowd_offsets=crowd_offsets,
        crowd_boxes=np.asarray(crowd_boxes, np.float32).reshape(-1, 4),
        crowd_labels=np.asarray(crowd_labels, np.int64).reshape(-1),
    )


def dataset_image_ids(dataset) -> list:
    """A dataset's image ids in item order: from ``VOCDataset``'s per-image records or the
    flat records' ``image_ids`` array (ints for COCO, strings otherwise)."""
    records = dataset.records
    if hasattr(records, "image_ids"):
        return records.image_ids.tolist()
    return [record.image_id for record in records]


class SeededItems(Dataset):
    """What every detection dataset here shares: ``ds[i]`` or ``ds[(i, seed)]`` (the loader's
    sampler gives each item its own seed, so any worker augments it alike) -> ``(image,
    target)``, the transform applied when there is one. Subclasses give ``_decode(index) ->
    (image, index used)`` (an image that does not decode may stand in for the next),
    ``get_target(index)`` and ``transform``."""

    def __getitem__(self, key):
        index, item_seed = key if isinstance(key, tuple) else (key, None)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, used = self._decode(index % len(self))
        target = self.get_target(used)
        if self.transform is None:
            return image, target
        return apply_seeded(self.transform, image, target, item_seed)


class FlatDetectionDataset(SeededItems):
    """Serves :class:`FlatRecords` as :class:`utils.data.VOCDataset` serves its records.

    ``ds[i]`` -> ``(image, target)``: a PIL RGB image and ``"boxes"`` ``[G, 4]`` float32
    normalised xyxy, ``"labels"`` ``[G]`` int64, ``"difficult"`` ``[G]`` bool (all False),
    ``"image_id"``, ``"orig_size"`` ``(height, width)``, ``"unreadable"`` (bool), ``"areas"``
    ``[G]`` float32 (pixels²), ``"crowd_boxes"`` ``[K, 4]`` and ``"crowd_labels"`` ``[K]``
    (crowd regions, not in ``"boxes"``); with a transform, ``transform(image, target)``.
    ``ds[(i, item_seed)]`` seeds the transform as VOCDataset does. An image that does not decode
    is replaced by the next one that does, or with ``keep_unreadable`` served as a grey image
    with ``"unreadable"`` True (its objects count as misses).
    """

    def __init__(self, records: FlatRecords, classes, skips: SkipLog, *, where: str, transform,
                 keep_unreadable):  # fmt: skip
        if not len(records.paths):
            found = "; ".join(skips.lines()) or "no image listed"
            raise ValueError(f"no usable image in {where}: {found}")
        self.records = records
        self.classes = tuple(classes)
        self.where = where
        self.transform = transform
        self.keep_unreadable = keep_unreadable
        self._failed: set[int] = set()
        self.unreadable: list = []
        self.skips = skips
        skips.log(where)

    @property
    def unknown_classes(self) -> Counter:
        """Objects skipped because their class name is not in the class list, per name."""
        return self.skips.unknown_classes

    def __len__(self) -> int:
        return len(self.records.paths)

    @property
    def num_objects(self) -> int:
        return len(self.records.labels)

    def image_path(self, index: int) -> str:
        return os.fsdecode(self.records.paths[index])

    def _size(self, index: int) -> tuple[int, int]:
        """``(height, width)``: the scan's, else the image header's (cached in this process)."""
        height, width = (int(v) for v in self.records.sizes[index])
        if height > 0:
            return height, width
        try:
            width, height = probe_image(self.image_path(index))
        except UnreadableImage:
            return _UNKNOWN_SIZE
        self.records.sizes[index] = (height, width)  # one page copied in this worker, at most
        return height, width

    def get_target(self, index: int) -> dict:
        """The target dict of item ``index`` without decoding its image."""
        rec = self.records
        start, stop = rec.offsets[index], rec.offsets[index + 1]
        crowd_start, crowd_stop = rec.crowd_offsets[index], rec.crowd_offsets[index + 1]
        image_id, size = rec.image_ids[index], self._size(index)
        areas = rec.areas[start:stop].copy()
        if np.isnan(areas).any():  # not given (YOLO-txt): the box's area in image pixels
            boxes = rec.boxes[start:stop].astype(np.float64)
            sides = boxes[:, 2:] - boxes[:, :2]  # [G, 2] (w, h)
            areas = (sides[:, 0] * size[1] * sides[:, 1] * size[0]).astype(np.float32)
        return {
            "boxes": torch.from_numpy(rec.boxes[start:stop].copy()),
            "labels": torch.from_numpy(rec.labels[start:stop].copy()),
            "difficult": torch.zeros(int(stop - start), dtype=torch.bool),
            "image_id": image_id.item() if hasattr(image_id, "item") else image_id,
            "orig_size": size,
            "unreadable": index in self._failed,
            "areas": torch.from_numpy(areas),
            "crowd_boxes": torch.from_numpy(rec.crowd_boxes[crowd_start:crowd_stop].copy()),
            "crowd_labels": torch.from_numpy(rec.crowd_labels[crowd_start:crowd_stop].copy()),
        }

    def _load(self, index: int) -> Image.Image | None:
        if index in self._failed:
            return None
        try:
            image, _ = load_rgb(self.image_path(index))
        except UnreadableImage as error:
            self._failed.add(index)
            self.unreadable.append(self.records.image_ids[index])
            log.warning("%s; %s", error, "kept as a grey image" if self.keep_unreadable else
                        "the next image is used in its place")  # fmt: skip
            return None
        if self.records.sizes[index, 0] <= 0:
            self.records.sizes[index] = (image.height, image.width)
        return image

    def _decode(self, index: int) -> tuple[Image.Image, int]:
        if self.keep_unreadable:
            image = self._load(index)
            if image is None:
                height, width = self._size(index)
                image = Image.new("RGB", (width, height), _GREY)
            return image, index
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            image = self._load(candidate)
            if image is not None:
                return image, candidate
        raise ValueError(f"no image of {self.where} decodes: check the files")
