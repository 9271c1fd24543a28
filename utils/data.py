"""The Pascal VOC-format detection dataset.

Layout (a VOCdevkit folder): a set ``(NAME, SPLIT)`` reads ``<root>/VOC<NAME>/ImageSets/Main/
<SPLIT>.txt`` (one image id per line) and, per id, ``Annotations/<id>.xml`` and its image in
``JPEGImages`` (the XML ``<filename>``, else ``<id>`` with .jpg/.jpeg/.png/.bmp in any case:
:class:`utils.voc.ImageFolder`). Boxes are in the VOC pixel frame (:mod:`utils.voc`): the XML
``(xmin, ymin, xmax, ymax)`` becomes ``((xmin - 1) / W, (ymin - 1) / H, xmax / W, ymax / H)`` of
the upright image (EXIF orientation applied: :mod:`utils.images`).

Bad input (each outcome is tested):

- at construction every annotation is parsed and every image header is read: a malformed XML, a
  missing bndbox/name or a non-numeric coordinate skips the file; a missing annotation, a
  missing, empty, non-image or too large (decompression-bomb) image skips the image; an unknown
  class name skips the object and is counted (``strict=True`` raises instead); inverted and
  fully outside boxes are dropped, boxes partly outside are clamped (counted, logged once); a
  missing ``<difficult>`` is 0; the image header gives the size (it wins over ``<size>``);
  images with no objects are kept, as background; an id repeated in a split file is kept once
  and reported once with its count;
- an image that ends early is decoded as far as its data goes and reported once per file and
  process (a DataLoader worker holds its own copy of the dataset and of what it has reported;
  workers persist across epochs, so a file is reported at most once per worker per run);
- an image that fails to decode at all: by default ``ds[i]`` returns the next index
  (cyclically) whose image decodes, with the same item seed (training: one image fewer).

Evaluation (``keep_unreadable=True``): nothing leaves the mAP silently. An image that cannot be
read, at the scan or at decode, keeps its record (boxes normalised with the XML ``<size>``; an
unreadable image without ``<size>`` is skipped and reported); ``ds[i]`` returns a mid-grey image
of that size and the target's ``"unreadable"`` is True (False for every other image);
``utils.loader.collate_detection`` copies it into each meta dict. The evaluator drops the
detections of such images, so their ground truths count as misses, and lists them.
``ds.unreadable`` lists the ids found at the scan and, in this process, at decode (a worker's
finds reach the main process only through the per-item flag).

Every skip is logged once per file (``logging.warning``, the first 20) and kept in
``ds.skipped`` as ``(file, reason)``; ``ds.summary()`` gives the counts. Files are only read.

The other formats live beside it and are importable from here: :class:`CocoDataset` (a COCO
instances JSON, :mod:`utils.coco`) and :class:`YoloDataset` (an ultralytics data.yaml,
:mod:`utils.yolotxt`) serve the same ``(image, target)`` items from flat numpy records;
:func:`utils.formats.open_dataset` picks the format from a path.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.coco import CocoDataset
from utils.images import UnreadableImage, load_rgb, probe_image
from utils.records import SeededItems
from utils.voc import (
    Annotation,
    BadAnnotation,
    ImageFolder,
    parse_annotation,
    read_split,
    voc_box,
)
from utils.yolotxt import YoloDataset

__all__ = ["VOC_CLASSES", "CocoDataset", "VOCDataset", "YoloDataset"]

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def available_sets(root: Path) -> list[str]:
    """``NAME:split`` of every ``VOC<NAME>/ImageSets/Main/<split>.txt`` under a devkit ``root``."""
    files = sorted(Path(root).glob("VOC*/ImageSets/Main/*.txt"))
    return [f"{f.parents[2].name[3:]}:{f.stem}" for f in files if "_" not in f.stem]


_HOW_TO_GET_VOC = (
    "get Pascal VOC with `python download_voc.py --root data`, import your own images and XML "
    "with `python import_voc.py`, or lay it out as <root>/VOC<NAME>/{JPEGImages,Annotations,"
    "ImageSets/Main}"
)
_MAX_WARNINGS = 20  # per dataset; the rest is counted in summary()
_GREY = (128, 128, 128)


@dataclass(frozen=True)
class _Record:
    image_id: str
    image_path: Path | None
    height: int
    width: int
    boxes: np.ndarray  # [G, 4] float32 normalised xyxy
    labels: np.ndarray  # [G] int64
    difficult: np.ndarray  # [G] bool
    readable: bool  # False: kept unreadable (keep_unreadable), served as a grey image


class VOCDataset(SeededItems):
    """VOC-format detection dataset (see the module docstring for layout and bad input).

    ``ds[i]`` -> ``(image, target)``: without a transform a PIL RGB image and a dict with
    ``"boxes"`` ``[G, 4]`` float32 normalised xyxy, ``"labels"`` ``[G]`` int64, ``"difficult"``
    ``[G]`` bool, ``"image_id"`` (str, the file stem), ``"orig_size"`` ``(height, width)`` and
    ``"unreadable"`` (bool); with a transform, ``transform(image, target)``.
    ``ds[(i, item_seed)]`` runs the transform with torch's global generator forked and seeded
    with ``item_seed``, so the augmentation depends only on (index, seed): the same in the main
    process or any worker. ``keep_unreadable=True`` is for evaluation sets (module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        sets: Sequence[tuple[str, str]] = (("2007", "trainval"), ("2012", "trainval")),
        classes: Sequence[str] = VOC_CLASSES,
        keep_difficult: bool = True,
        transform=None,
        *,
        strict: bool = False,
        keep_unreadable: bool = False,
    ):
        self.root = Path(root)
        self.sets = [tuple(pair) for pair in sets]
        self.classes = tuple(classes)
        self.keep_difficult = keep_difficult
        self.transform = transform
        self.strict = strict
        self.keep_unreadable = keep_unreadable
        self.skipped: list[tuple[str, str]] = []
        self.unreadable: list[str] = []
        self.unknown_classes: Counter[str] = Counter()
        self.clamped_files: list[str] = []
        self.num_clamped = 0
        self._class_index = {name: index for index, name in enumerate(self.classes)}
        self._warned = 0
        self._failed: set[int] = set()
        self._truncated: set[int] = set()
        self.records: list[_Record] = []
        for name, split in self.sets:
            self.records.extend(self._scan_set(name, split))
        self._log_scan()
        if not self.records:
            raise ValueError(f"no usable image in {self.root} sets {self.sets}: {self.summary()}")

    # ----------------------------------------------------------------------------------- scan

    def _scan_set(self, name: str, split: str) -> list[_Record]:
        folder = self.root / f"VOC{name}"
        set_file = folder / "ImageSets" / "Main" / f"{split}.txt"
        if not set_file.is_file():
            what = "folder" if not folder.is_dir() else "image set file"
            missing = folder if not folder.is_dir() else set_file
            found = available_sets(self.root)
            how = _HOW_TO_GET_VOC
            if found:  # --data VOC<NAME> reads that folder's train and val: name the devkit
                how = (f"this folder holds the sets {', '.join(found)}: name them with "
                       f"--train-sets and --val-set and give --data {self.root} (kmeans.py: "
                       "--sets)")  # fmt: skip
            raise FileNotFoundError(f"{what} {missing} not found for set {name}:{split}: {how}")
        ids, repeated = read_split(set_file)
        if repeated:
            examples = ", ".join(f"{i} x{n}" for i, n in list(repeated.items())[:3])
            extra = sum(repeated.values()) - len(repeated)
            self._skip(
                set_file, f"duplicate ids: {extra} repeats dropped, each id kept once ({examples})"
            )
        images = ImageFolder(folder / "JPEGImages")
        records = [self._scan_one(folder, images, image_id) for image_id in ids]
        return [record for record in records if record is not None]

    def _scan_one(self, folder: Path, images: ImageFolder, image_id: str) -> _Record | None:
        xml_path = folder / "Annotations" / f"{image_id}.xml"
        try:
            annotation = parse_annotation(xml_path)
        except BadAnnotation as error:
            self._skip(xml_path, str(error))
            return None
        image_path, reason = images.find(image_id, annotation.filename)
        size = None
        if image_path is not None:
            try:
                size = probe_image(image_path)
            except UnreadableImage as error:
                reason = error.reason
        readable = size is not None
        if not readable:
            shown = image_path or folder / "JPEGImages" / (annotation.filename or image_id)
            size = self._unreadable_size(shown, reason, annotation)
            if size is None:
                return None
            self.unreadable.append(image_id)
        width, height = size
        boxes, labels, difficult = self._boxes(xml_path, annotation, width, height)
        return _Record(image_id, image_path, height, width, boxes, labels, difficult, readable)

    def _unreadable_size(self, path, reason: str, annotation: Annotation) -> tuple | None:
        """The XML ``<size>`` to keep an unreadable image with (keep_unreadable), else None."""
        if not self.keep_unreadable:
            self._skip(path, reason)
            return None
        if annotation.size is None:
            self._skip(path, f"{reason}; no <size> in its XML either: skipped")
            return None
        width, height = annotation.size
        kept = f"kept as a grey {width}x{height} image (XML <size>): its objects count as misses"
        self._skip(path, f"{reason}; {kept}")
        return annotation.size

    def _boxes(self, xml_path: Path, annotation: Annotation, width: int, height: int):
        """``[G, 4]`` float32 boxes, ``[G]`` int64 labels, ``[G]`` bool difficult flags."""
        boxes, labels, difficult, notes = [], [], [], []
        for index, obj in enumerate(annotation.objects):
            if obj.difficult and not self.keep_difficult:
                continue
            label = self._class_index.get(obj.name)
            if label is None:
                if self.strict:
                    raise ValueError(
                        f"{xml_path}: object {index} has class {obj.name!r}, which is not in the "
                        f"class list {list(self.classes)}: add it to the classes file, or leave "
                        f"out --strict (strict=False) to skip such objects"
                    )
                self.unknown_classes[obj.name] += 1
                notes.append(f"object {index}: unknown class {obj.name!r}, skipped")
                continue
            box, note = voc_box(obj.corners, width, height)
            if note == "clamped":
                self.num_clamped += 1
                self.clamped_files.append(str(xml_path))
            if box is None:
                notes.append(f"object {index} ({obj.name}): {note}")
                continue
            boxes.append(box)
            labels.append(label)
            difficult.append(obj.difficult)
        if notes:
            self._skip(xml_path, "; ".join(notes))
        return (
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),  # [G, 4]
            np.asarray(labels, dtype=np.int64),
            np.asarray(difficult, dtype=bool),
        )

    def _log_scan(self) -> None:
        if self.unknown_classes:
            log.warning(
                "%s: objects of classes not in the class list were skipped: %s",
                self.root,
                dict(self.unknown_classes),
            )
        if self.num_clamped:
            log.warning(
                "%s: %d boxes partly outside their image were clamped to it (in %d files, "
                "first %s)",
                self.root,
                self.num_clamped,
                len(set(self.clamped_files)),
                self.clamped_files[0],
            )

    def _skip(self, path, reason: str) -> None:
        self.skipped.append((str(path), reason))
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            log.warning("%s: %s", path, reason)
        elif self._warned == _MAX_WARNINGS + 1:
            log.warning("%s: more skips are not logged; see summary()", self.root)

    def summary(self) -> str:
        """One line: images, objects, and what was skipped, dropped or clamped, with counts."""
        objects = sum(len(record.labels) for record in self.records)
        kinds = Counter(
            re.sub(r"^object \d+: ", "", reason.split(" (")[0].split(",")[0])  # one per kind
            for _, reason in self.skipped
        )
        text = (
            f"{len(self.records)} images, {objects} objects from "
            f"{', '.join(f'{n}:{s}' for n, s in self.sets)} in {self.root} "
            f"({len(self.classes)} classes, difficult "
            f"{'kept' if self.keep_difficult else 'left out'})"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} files with skips: {dict(kinds)}"
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable images kept (their objects are misses)"
        if self.unknown_classes:
            text += f"; unknown classes skipped: {dict(self.unknown_classes)}"
        if self.num_clamped:
            text += f"; {self.num_clamped} boxes clamped to the image"
        return text

    # ---------------------------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self.records)

    def get_target(self, index: int) -> dict:
        """The target dict of item ``index`` without decoding its image."""
        record = self.records[index]
        return {
            "boxes": torch.from_numpy(record.boxes.copy()),
            "labels": torch.from_numpy(record.labels.copy()),
            "difficult": torch.from_numpy(record.difficult.copy()),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
            "unreadable": not record.readable or index in self._failed,
        }

    def _load(self, index: int) -> Image.Image | None:
        """The decoded image of ``index``, or None when it does not decode (reported once)."""
        record = self.records[index]
        if not record.readable or index in self._failed:
            return None
        try:
            image, truncated = load_rgb(record.image_path)
        except UnreadableImage as error:
            self._failed.add(index)
            if self.keep_unreadable:
                self.unreadable.append(record.image_id)
                then = "kept as a grey image: its objects count as misses"
            else:
                then = "the next image is used in its place"
            self._skip(record.image_path, f"decode failed ({error.reason}); {then}")
            return None
        if truncated and index not in self._truncated:
            self._truncated.add(index)
            log.warning(
                "%s: the file ends early; decoded as far as its data goes (pid %d)",
                record.image_path,
                os.getpid(),
            )
        return image

    def _decode(self, index: int) -> tuple[Image.Image, int]:
        """The image of ``index``; when it does not decode, a grey image (keep_unreadable) or
        the image of the next index that decodes."""
        if self.keep_unreadable:
            image = self._load(index)
            if image is None:
                record = self.records[index]
                image = Image.new("RGB", (record.width, record.height), _GREY)
            return image, index
        for step in range(len(self.records)):
            candidate = (index + step) % len(self.records)
            image = self._load(candidate)
            if image is not None:
                return image, candidate
        raise ValueError(f"no image of {self.root} sets {self.sets} decodes: check the files")
