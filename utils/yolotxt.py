"""YOLO-txt datasets (ultralytics' ``data.yaml``) -> :class:`utils.records.FlatRecords`.

``data.yaml``: ``path`` (the root; relative to the YAML's folder), ``train``, ``val``, optional
``test`` (each a folder of images, a ``.txt`` list of image paths, or a list of either, relative
to ``path``) and ``names`` (a list, or a dict ``{0: name}``). A plain folder with ``images/`` and
``labels/`` (``classes.txt`` for the names) reads as such a YAML (:func:`folder_config`). An
image's label file replaces the last ``images`` folder of its path with ``labels`` and its suffix
with ``.txt``; an image without one is a negative. A label line ``c cx cy w h`` (normalised)
is the box ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``, clamped to [0, 1].

Bad lines, each counted per kind and logged once with an example: a class index out of range,
a wrong column count, a non-number, coordinates outside [0, 1] or a non-positive size. An image
listed twice is kept once. A YAML that is not a dataset is one error naming it and the fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import yaml

from utils.coco import BadDataset
from utils.images import IMAGE_SUFFIXES
from utils.records import FlatDetectionDataset, SkipLog, pack_records
from utils.voc import load_classes, read_text_lines

__all__ = ["YoloDataset", "folder_config", "label_path", "load_data_yaml", "scan_yolo"]

log = logging.getLogger(__name__)

_YAML_HINT = "give an ultralytics data.yaml with path, train, val and names"


def _parse_yaml(path: Path) -> object:
    return yaml.safe_load("\n".join(read_text_lines(path)))


def load_data_yaml(path: str | os.PathLike) -> dict:
    """A checked data.yaml: ``{"root": Path, "names": tuple, split: entry, ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.yaml {path} not found: {_YAML_HINT}")
    try:
        document = _parse_yaml(path)
    except Exception as error:  # any parser's error: the file is not usable YAML
        raise BadDataset(f"{path} is not readable YAML ({error}): {_YAML_HINT}") from None
    if not isinstance(document, dict) or "names" not in document:
        raise BadDataset(f"{path} is not a YOLO dataset YAML (no 'names'): {_YAML_HINT}")
    names = document["names"]
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise BadDataset(f"{path}: names keys {keys[:5]}... must be 0..N-1: renumber them")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise BadDataset(f"{path}: names must be a non-empty list or {{0: name}} map")
    root = Path(str(document.get("path") or "."))
    root = root if root.is_absolute() else path.parent / root
    splits = {k: document[k] for k in ("train", "val", "test") if document.get(k) is not None}
    return {"root": root, "names": tuple(str(n) for n in names), "file": path, **splits}


def folder_config(folder: str | os.PathLike) -> dict:
    """A plain folder ``images/`` + ``labels/`` (+ ``classes.txt``) as a data.yaml dict: splits
    ``train``/``val`` are ``images/train``/``images/val`` where present, ``all`` is ``images``."""
    folder = Path(folder)
    if not (folder / "images").is_dir() or not (folder / "labels").is_dir():
        raise FileNotFoundError(f"{folder}: a YOLO-txt folder holds images/ and labels/")
    classes_file = folder / "classes.txt"
    if not classes_file.is_file():
        classes_file = folder / "labels" / "classes.txt"
    if not classes_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no classes.txt (one class name per line, line i naming class i): "
            f"write it there, or give a data.yaml with names"
        )
    config = {"root": folder, "names": load_classes(classes_file), "file": classes_file}
    config["all"] = "images"
    for split in ("train", "val", "test"):
        if (folder / "images" / split).is_dir():
            config[split] = f"images/{split}"
    return config


def label_path(image: Path) -> Path:
    """``.../images/x/a.jpg`` -> ``.../labels/x/a.txt`` (the last ``images`` folder)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _list_images(entry, root: Path, skips: SkipLog) -> list[Path]:
    if isinstance(entry, list):
        return [image for item in entry for image in _list_images(item, root, skips)]
    path = Path(str(entry))
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        found = []
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            found += [Path(folder) / f for f in sorted(files)
                      if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]  # fmt: skip
        return found
    if path.suffix == ".txt" and path.is_file():
        lines = [line.strip() for line in read_text_lines(path) if line.strip()]
        return [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
    raise FileNotFoundError(f"split entry {entry} ({path}) is neither a folder nor a .txt list")


def _read_labels(path: Path, num_classes: int, skips: SkipLog):
    """Rows ``(label, x1, y1, x2, y2)`` of one label file; bad lines counted in ``skips``."""
    rows = []
    for number, line in enumerate(read_text_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            skips.add("label lines without 5 columns (c cx cy w h)", where, line.strip()[:60])
            continue
        try:
            label, cx, cy, w, h = (float(v) for v in fields)
        except ValueError:
            skips.add("label lines with a non-number", where, line.strip()[:60])
            continue
        if not (label.is_integer() and 0 <= label < num_classes):
            skips.add(f"class index outside 0..{num_classes - 1}", where, f"class {fields[0]}")
            continue
        # plain float comparisons, per line: NaN and infinities fail them too
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            skips.add("coordinates outside [0, 1]", where, line.strip()[:60])
            continue
        if w <= 0 or h <= 0:
            skips.add("boxes of non-positive size", where, line.strip()[:60])
            continue
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        rows.append((int(label), *(min(max(v, 0.0), 1.0) for v in box)))
    return rows


def _path_id(image: Path, root: Path) -> str:
    """An image id that tells apart images of one stem: its path under ``root`` (or whole)."""
    try:
        return image.relative_to(root).as_posix()
    except ValueError:
        return image.as_posix()


def scan_yolo(config: dict, split: str, classes=None, *, labels_dir: Path | None = None):
    """``(records, classes, skips)`` of one split of a :func:`load_data_yaml` dict. With
    ``classes``, labels map by name (the YAML's names) to that list; others are skipped.
    ``labels_dir``: every label file is ``labels_dir/<image stem>.txt`` instead."""
    if split not in config:
        have = [k for k in ("train", "val", "test", "all") if k in config]
        if "all" in config:  # a plain folder without images/train, images/val
            root = config["root"]
            raise BadDataset(
                f"{root} has no images/{split} folder: split it with python import_voc.py "
                f"--images {root / 'images'} --annotations {root / 'labels'} --out data/NAME, "
                f"or lay it out as images/train, images/val (labels/ alike)"
            )
        raise BadDataset(f"{config['file']}: no split {split!r} (it has {have}): add it")
    names, skips = config["names"], SkipLog()
    remap = np.arange(len(names))
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        remap = np.array([index.get(name, -1) for name in names])
    images = list(dict.fromkeys(_list_images(config[split], Path(config["root"]), skips)))
    paths, ids, owner, rows = [], [], [], []
    for image in images:
        labels = label_path(image) if labels_dir is None else labels_dir / f"{image.stem}.txt"
        if not image.is_file():
            skips.add("listed images without a file", image)
            continue
        found = _read_labels(labels, len(names), skips) if labels.is_file() else []
        owner += [len(paths)] * len(found)
        rows += found
        paths.append(image)
        ids.append(image.stem)
    if len(set(ids)) < len(ids):  # x.jpg and x.png, or one name in two folders: whole paths
        ids = [_path_id(image, Path(config["root"])) for image in paths]
    table = np.array(rows, np.float64).reshape(-1, 5)
    label = remap[table[:, 0].astype(np.int64)]
    for i in table[label < 0, 0].astype(int):
        skips.unknown_classes[names[i]] += 1
    if (label < 0).any():
        skips.add("objects of classes not in the class list", config["file"],
                  str(sorted({names[i] for i in table[label < 0, 0].astype(int)})[:5]),
                  count=int((label < 0).sum()))  # fmt: skip
    keep, owner = label >= 0, np.array(owner, np.int64)
    empty = np.zeros((0, 4))
    records = pack_records(
        paths, np.array(ids, dtype=str), np.zeros((len(paths), 2)), owner[keep],
        table[keep, 1:], label[keep], np.full(int(keep.sum()), np.nan), [], empty, [],
    )  # fmt: skip
    return records, tuple(classes) if classes is not None else names, skips


class YoloDataset(FlatDetectionDataset):
    """One split of a YOLO-txt dataset: ``data_yaml`` is a data.yaml or a plain folder with
    ``images/`` and ``labels/`` (module docstring). ``ds[i]`` as
    :class:`utils.records.FlatDetectionDataset`; ``image_id`` is the image's file stem (its
    path under the dataset's root where two images share a stem) and ``"areas"`` the box areas
    in pixels of the image."""

    def __init__(self, data_yaml, split: str = "train", transform=None, *, classes=None,
                 keep_unreadable: bool = False):  # fmt: skip
        source = Path(data_yaml)
        config = folder_config(source) if source.is_dir() else load_data_yaml(source)
        records, names, skips = scan_yolo(config, split, classes)
        super().__init__(records, names, skips, where=f"{source} ({split})", transform=transform,
                         keep_unreadable=keep_unreadable)  # fmt: skip
        self.data_yaml, self.split = source, split

    def summary(self) -> str:
        text = f"{len(self)} images, {self.num_objects} objects from {self.where}"
        return text + "".join(f"; {line}" for line in self.skips.lines())
