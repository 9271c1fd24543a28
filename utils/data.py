"""Pascal VOC-format detection data: dataset, seeded sampler, collate, loader, download.

Layout (a VOCdevkit folder): a set ``(NAME, SPLIT)`` reads ``<root>/VOC<NAME>/ImageSets/Main/
<SPLIT>.txt`` (one image id per line) and, per id, ``JPEGImages/<id>.jpg`` and
``Annotations/<id>.xml``.

Boxes follow darknet's ``voc_label.py``: VOC's 1-based pixel corners become
``x1 = (xmin - 1) / width``, ``x2 = (xmax - 1) / width`` (same for y), so a box is
``xmax - xmin`` pixels wide and ``xmin == xmax`` is a zero-area box.

Bad input (each outcome is tested):

- at construction every annotation is parsed (with defusedxml: no DTD entities, no external
  resources) and every image header is read: a malformed or truncated XML, a missing
  bndbox/name or a non-numeric coordinate skips the file; a missing annotation, a missing,
  zero-byte or non-image file skips the image; an unknown class name skips the object and is
  counted (``strict=True`` raises instead); zero-area, inverted and fully outside boxes are
  dropped; boxes partly outside the image are clamped; a missing ``<difficult>`` is 0; a missing
  ``<size>`` is fine: the image header gives the size (it always wins over ``<size>``); images
  with no objects are kept, as background;
- an image that fails to decode later (truncated data) is never returned: ``ds[i]`` returns the
  next index (cyclically) whose image decodes, with the same item seed, and records the file.
  In a DataLoader worker the record lives in that worker's copy (its warning is logged there).

Every skip is logged once per file (``logging.warning``) and kept in ``ds.skipped`` as
``(file, reason)``; ``ds.summary()`` gives the counts. Files are only ever read. There is no scan
cache: parsing the XML and image headers of VOC07+12 trainval takes a few seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import defusedxml.ElementTree as SafeET
import numpy as np
import torch
from defusedxml import DefusedXmlException
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from utils.boxes import xyxy_to_cxcywh

__all__ = [
    "VOC_CLASSES",
    "VOC_TARBALLS",
    "SeededSampler",
    "VOCDataset",
    "build_dataloader",
    "collate_detection",
    "download_voc",
    "load_classes",
    "parse_sets",
]

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_HOW_TO_GET_VOC = (
    "get Pascal VOC with the --download flag (utils.data.download_voc), or lay it out by hand "
    "as <root>/VOC<NAME>/{JPEGImages,Annotations,ImageSets/Main}"
)
_MAX_WARNINGS = 20  # per dataset; the rest is counted in summary()


def load_classes(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a text file, one per line; blank lines and surrounding spaces ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} not found: write one class name per line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"classes file {path} is empty: write one class name per line")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"classes file {path} names {duplicates} more than once: keep one each")
    return tuple(names)


def parse_sets(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``["2007:trainval", "2007:test"]`` -> ``[("2007", "trainval"), ("2007", "test")]``."""
    if isinstance(specs, str):
        specs = [specs]
    pairs = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 2 or not all(part.strip() for part in parts):
            raise ValueError(
                f"image set {spec!r} is not NAME:SPLIT (e.g. 2007:trainval, 2007:test)"
            )
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


# ---------------------------------------------------------------------------------------------
# Parsing


class _SkipFile(Exception):
    """The file cannot be used; the message says why."""


@dataclass(frozen=True)
class _Object:
    name: str
    difficult: bool
    corners: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as written (1-based)


@dataclass(frozen=True)
class _Record:
    image_id: str
    image_path: Path
    height: int
    width: int
    boxes: np.ndarray  # [G, 4] float32 normalised xyxy
    labels: np.ndarray  # [G] int64
    difficult: np.ndarray  # [G] bool


def _parse_annotation(path: Path) -> list[_Object]:
    """Objects of a VOC XML file; raises _SkipFile when it cannot be trusted."""
    try:
        root = SafeET.parse(path).getroot()
    except FileNotFoundError:
        raise _SkipFile("missing annotation") from None
    except (SafeET.ParseError, DefusedXmlException, OSError) as error:
        raise _SkipFile(f"malformed XML ({type(error).__name__}: {error})") from None
    objects = []
    for index, node in enumerate(root.iter("object")):
        name = (node.findtext("name") or "").strip()
        if not name:
            raise _SkipFile(f"malformed XML (object {index} has no <name>)")
        corners = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            text = node.findtext(f"bndbox/{key}")
            try:
                corners.append(float(text))
            except (TypeError, ValueError):
                raise _SkipFile(f"bad coordinates (object {index} {key}={text!r})") from None
        if not all(np.isfinite(corners)):
            raise _SkipFile(f"bad coordinates (object {index}: {corners})")
        flag = (node.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise _SkipFile(f"malformed XML (object {index} difficult={flag!r}, expected 0 or 1)")
        objects.append(_Object(name, flag == "1", tuple(corners)))
    return objects


def _probe_image(path: Path) -> tuple[int, int]:
    """(width, height) from the image header; raises _SkipFile for a missing or non-image file."""
    try:
        if path.stat().st_size == 0:
            raise _SkipFile("empty image file (0 bytes)")
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise _SkipFile("missing image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise _SkipFile(f"not an image ({type(error).__name__}: {error})") from None


def _object_box(obj: _Object, width: int, height: int) -> tuple[np.ndarray | None, str]:
    """Normalised xyxy box (or None when dropped) and a note (why dropped/clamped, or '')."""
    xmin, ymin, xmax, ymax = obj.corners
    if xmax < xmin or ymax < ymin:
        return None, f"inverted box {obj.corners}, dropped"
    raw = np.array([xmin - 1, ymin - 1, xmax, ymax], dtype=np.float64)  # VOC pixel frame
    limits = np.array([width, height, width, height], dtype=np.float64)
    clamped = np.clip(raw, 0.0, limits)
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        return None, f"box {obj.corners} outside the {width}x{height} image, dropped"
    note = "clamped" if not np.array_equal(raw, clamped) else ""
    return (clamped / limits).astype(np.float32), note


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (grey, CMYK, RGBA, palette, 16-bit grey, ...)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA") and (image.mode == "PA" or "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)  # [H, W]
        top = 65535.0 if image.mode.startswith("I;16") else max(values.max(), 255.0)
        grey = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


# ---------------------------------------------------------------------------------------------
# Dataset


class VOCDataset(Dataset):
    """VOC-format detection dataset (see the module docstring for layout and bad input).

    ``ds[i]`` -> ``(image, target)``: without a transform a PIL RGB image and a dict with
    ``"boxes"`` ``[G, 4]`` float32 normalised xyxy, ``"labels"`` ``[G]`` int64, ``"difficult"``
    ``[G]`` bool, ``"image_id"`` (str, the file stem) and ``"orig_size"`` ``(height, width)``;
    with a transform, ``transform(image, target)``. ``ds[(i, item_seed)]`` runs the transform
    with torch's global generator forked and seeded with ``item_seed``, so the augmentation
    depends only on (index, seed): the same in the main process or any worker.
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
    ):
        self.root = Path(root)
        self.sets = [tuple(pair) for pair in sets]
        self.classes = tuple(classes)
        self.keep_difficult = keep_difficult
        self.transform = transform
        self.strict = strict
        self.skipped: list[tuple[str, str]] = []
        self.unknown_classes: Counter[str] = Counter()
        self.num_clamped = 0
        self._class_index = {name: index for index, name in enumerate(self.classes)}
        self._warned = 0
        self._failed: set[int] = set()
        self.records: list[_Record] = []
        for name, split in self.sets:
            self.records.extend(self._scan_set(name, split))
        if self.unknown_classes:
            log.warning(
                "%s: objects of classes not in the class list were skipped: %s",
                self.root,
                dict(self.unknown_classes),
            )
        if not self.records:
            raise ValueError(f"no usable image in {self.root} sets {self.sets}: {self.summary()}")

    def _scan_set(self, name: str, split: str) -> list[_Record]:
        folder = self.root / f"VOC{name}"
        set_file = folder / "ImageSets" / "Main" / f"{split}.txt"
        if not set_file.is_file():
            what = "folder" if not folder.is_dir() else "image set file"
            missing = folder if not folder.is_dir() else set_file
            raise FileNotFoundError(
                f"{what} {missing} not found for set {name}:{split}: {_HOW_TO_GET_VOC}"
            )
        ids = [line.split()[0] for line in set_file.read_text().splitlines() if line.strip()]
        records = []
        for image_id in ids:
            record = self._scan_one(folder, image_id)
            if record is not None:
                records.append(record)
        return records

    def _scan_one(self, folder: Path, image_id: str) -> _Record | None:
        xml_path = folder / "Annotations" / f"{image_id}.xml"
        image_path = folder / "JPEGImages" / f"{image_id}.jpg"
        try:
            objects = _parse_annotation(xml_path)
        except _SkipFile as error:
            self._skip(xml_path, str(error))
            return None
        try:
            width, height = _probe_image(image_path)
        except _SkipFile as error:
            self._skip(image_path, str(error))
            return None
        boxes, labels, difficult, notes = [], [], [], []
        for index, obj in enumerate(objects):
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
            box, note = _object_box(obj, width, height)
            self.num_clamped += note == "clamped"
            if box is None:
                notes.append(f"object {index} ({obj.name}): {note}")
                continue
            boxes.append(box)
            labels.append(label)
            difficult.append(obj.difficult)
        if notes:
            self._skip(xml_path, "; ".join(notes))
        return _Record(
            image_id,
            image_path,
            height,
            width,
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),  # [G, 4]
            np.asarray(labels, dtype=np.int64),
            np.asarray(difficult, dtype=bool),
        )

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((str(path), reason))
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            log.warning("%s: %s", path, reason)
        elif self._warned == _MAX_WARNINGS + 1:
            log.warning("%s: more skips are not logged; see summary()", self.root)

    def summary(self) -> str:
        """One line: images, objects, and what was skipped, dropped or clamped, with counts."""
        objects = sum(len(record.labels) for record in self.records)
        kinds = Counter(reason.split(" (")[0].split(",")[0] for _, reason in self.skipped)
        text = (
            f"{len(self.records)} images, {objects} objects from "
            f"{', '.join(f'{n}:{s}' for n, s in self.sets)} in {self.root} "
            f"({len(self.classes)} classes, difficult "
            f"{'kept' if self.keep_difficult else 'left out'})"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} files with skips: {dict(kinds)}"
        if self.unknown_classes:
            text += f"; unknown classes skipped: {dict(self.unknown_classes)}"
        if self.num_clamped:
            text += f"; {self.num_clamped} boxes clamped to the image"
        return text

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
        }

    def _decode(self, index: int) -> tuple[Image.Image, int]:
        """The image of ``index`` or of the next index whose image decodes."""
        for step in range(len(self.records)):
            candidate = (index + step) % len(self.records)
            if candidate in self._failed:
                continue
            path = self.records[candidate].image_path
            try:
                return _load_rgb(path), candidate
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                self._failed.add(candidate)
                reason = f"decode failed ({type(error).__name__}: {error})"
                self._skip(path, f"{reason}; the next image is used in its place")
        raise RuntimeError(f"no image of {self.root} sets {self.sets} decodes")

    def __getitem__(self, key: int | tuple[int, int]):
        index, item_seed = key if isinstance(key, tuple) else (key, None)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, used = self._decode(index % len(self))
        target = self.get_target(used)
        if self.transform is None:
            return image, target
        if item_seed is None:
            return self.transform(image, target)
        with torch.random.fork_rng(devices=[]):
            # torch.manual_seed(item_seed) for the CPU generator alone: the full call also
            # queues lazy CUDA/XPU/MTIA seeding with a stack trace, ~0.5 ms per item
            torch.default_generator.manual_seed(item_seed)
            return self.transform(image, target)


# ---------------------------------------------------------------------------------------------
# Sampling, batching, loading


def _mix(*values: int) -> int:
    """A 63-bit seed from integers: stable across processes, platforms and Python versions."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)`` pairs for ``VOCDataset``; resumable, shardable.

    The order is a permutation drawn from (seed, epoch) when ``shuffle``, else ``0..n-1``;
    ``item_seed`` is derived from (seed, epoch, index). With ``num_replicas > 1`` it shards as
    ``DistributedSampler`` does: the order is padded by repetition (or, with ``drop_last``,
    truncated) to a multiple of ``num_replicas`` and rank ``r`` takes every ``num_replicas``-th
    item from ``r``. ``set_epoch(epoch, start)`` picks the epoch and skips the first ``start``
    items of this rank's order (to resume mid-epoch: ``start`` counts items, not batches).
    ``len()`` is the number of items this rank yields from ``start``.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(f"drop_last with {dataset_len} items leaves none for some ranks")
        self.dataset_len, self.shuffle, self.seed = dataset_len, shuffle, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        if drop_last:
            self.num_samples = dataset_len // num_replicas
        else:
            self.num_samples = -(-dataset_len // num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} is not in [0, {self.num_samples}] for this rank")
        self.epoch, self.start = epoch, start

    def rank_indices(self) -> list[int]:
        """This rank's whole order for the current epoch (before ``start``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.num_replicas
        while len(order) < total:
            order += order[: total - len(order)]
        return order[:total][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.rank_indices()[self.start :]:
            yield index, _mix(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples - self.start


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]):
    """List of (image ``[3, H, W]``, target) -> (images, targets, metas).

    ``images`` ``[N, 3, H, W]`` float32; ``targets`` ``[N, G, 5]`` float32 rows
    ``(class, cx, cy, w, h)`` normalised, padding rows ``(-1, 0, 0, 0, 0)``, ``G`` the most boxes
    of an image in the batch (at least 1); ``metas`` one dict per image with ``"image_id"``,
    ``"orig_size"`` (height, width) and ``"gt"`` ``[G_i, 6]`` float32
    ``(x1, y1, x2, y2, class, difficult)`` normalised (the evaluation ground truth).
    """
    images = torch.stack([image for image, _ in batch]).to(torch.float32)  # [N, 3, H, W]
    most = max([1] + [len(target["labels"]) for _, target in batch])
    targets = torch.zeros(len(batch), most, 5, dtype=torch.float32)
    targets[..., 0] = -1.0
    metas = []
    for row, (_, target) in enumerate(batch):
        boxes = target["boxes"].to(torch.float32).reshape(-1, 4)  # [G_i, 4]
        labels = target["labels"].to(torch.float32)
        targets[row, : len(labels), 0] = labels
        targets[row, : len(labels), 1:] = xyxy_to_cxcywh(boxes)
        gt = torch.cat([boxes, labels[:, None], target["difficult"].to(torch.float32)[:, None]], 1)
        metas.append({"image_id": target["image_id"], "orig_size": target["orig_size"], "gt": gt})
    return images, targets, metas


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed Python's and numpy's generators from torch's worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int,
    drop_last: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``SeededSampler`` pairs with ``collate_detection``.

    ``loader.sampler`` is the ``SeededSampler`` (call ``loader.sampler.set_epoch(epoch, start)``
    before each epoch). ``drop_last`` drops the last incomplete batch and truncates the shards.
    Workers persist across epochs; memory is pinned by default when CUDA is available.
    """
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    sampler = SeededSampler(
        len(dataset),
        shuffle=shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_detection,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------
# Download

_VOC_BASE_URL = "http://host.robots.ox.ac.uk/pascal/VOC"
# item -> (tarball, folder on the official host, md5, the file whose presence means "extracted")
VOC_TARBALLS = {
    "2007-trainval": ("VOCtrainval_06-Nov-2007.tar", "voc2007",
                      "c52e279531787c972589f7e41ab4ae64", "VOC2007/ImageSets/Main/trainval.txt"),
    "2007-test": ("VOCtest_06-Nov-2007.tar", "voc2007",
                  "b6e924de25625d8de591ea690078ad9f", "VOC2007/ImageSets/Main/test.txt"),
    "2012-trainval": ("VOCtrainval_11-May-2012.tar", "voc2012",
                      "6cd6e144f989b92b3379bac3b3de84fd", "VOC2012/ImageSets/Main/trainval.txt"),
}  # fmt: skip


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, destination: Path, md5: str) -> None:
    """Stream ``url`` to a temp file beside ``destination``, check md5, rename atomically."""
    handle, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    digest = hashlib.md5()
    try:
        with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    file.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ValueError(
                f"{url} downloaded with md5 {digest.hexdigest()}, expected {md5}: the file is "
                f"corrupt or not the VOC release; try again, or another --mirror"
            )
        os.replace(temp_name, destination)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


def _extract(tarball: Path, root: Path, sentinel: str) -> None:
    """Extract a VOC tarball into ``root``, dropping its leading ``VOCdevkit/``.

    Only regular files and folders are written, never outside ``root``; the ``sentinel`` file
    is written last, so its presence means the extraction finished.
    """
    with tarfile.open(tarball) as archive:
        members, last = [], None
        for member in archive:
            parts = PurePosixPath(member.name).parts
            relative = PurePosixPath(*parts[1:]) if parts[:1] == ("VOCdevkit",) else None
            if relative is None or not (member.isfile() or member.isdir()):
                continue
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise ValueError(f"{tarball}: refusing the unsafe member {member.name!r}")
            if str(relative) == sentinel:
                last = (member, relative)
            else:
                members.append((member, relative))
        for member, relative in members + ([last] if last else []):
            target = root.joinpath(*relative.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)


def download_voc(
    root: str | os.PathLike,
    *,
    items: Sequence[str] = ("2007-trainval", "2007-test", "2012-trainval"),
    mirror: str | None = None,
) -> Path:
    """Download (md5-checked) and extract VOC into ``root`` (the VOCdevkit folder); returns it.

    An item whose ``ImageSets/Main`` file is already there is skipped; a tarball already in
    ``root`` with the right md5 is not downloaded again. ``mirror`` replaces the official base
    URL: the tarball is fetched from ``<mirror>/<tarball name>``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for item in items:
        if item not in VOC_TARBALLS:
            raise ValueError(f"unknown VOC item {item!r}: choose from {list(VOC_TARBALLS)}")
        name, folder, md5, sentinel = VOC_TARBALLS[item]
        if (root / sentinel).is_file():
            log.info("%s already extracted in %s", item, root)
            continue
        tarball = root / name
        url = f"{mirror.rstrip('/')}/{name}" if mirror else f"{_VOC_BASE_URL}/{folder}/{name}"
        if not (tarball.is_file() and _md5(tarball) == md5):
            log.info("downloading %s from %s", name, url)
            try:
                _fetch(url, tarball, md5)
            except (urllib.error.URLError, OSError) as error:
                raise ConnectionError(
                    f"could not download {url} ({error}). Fetch {name} (md5 {md5}) by hand from "
                    f"{url} or a mirror and put it at {tarball}, or extract it so that "
                    f"{root / sentinel} exists; then run again"
                ) from error
        log.info("extracting %s into %s", name, root)
        _extract(tarball, root, sentinel)
    return root
