"""One entry point for every dataset format: ``open_dataset(path, split)``.

The format follows from the path (``data_format`` forces it):

- ``voc``: a VOCdevkit folder (``VOC<NAME>/`` inside; its sets come from ``voc_sets``, the
  ``--train-sets``/``--val-set`` flags) or one ``VOC<NAME>`` folder (its ``<split>.txt``). Its
  classes are those of a ``classes.txt`` in the ``VOC<NAME>`` folder or the devkit folder (where
  ``import_voc.py`` writes it), else VOC's 20;
- ``coco``: an ``instances_*.json``, or a folder in COCO's layout ``annotations/instances_<S>.json``
  + ``<S>/`` images. Splits: in a folder, ``train`` is the one instances file whose name holds
  ``train``, ``val`` the one holding ``val``. A file is its own ``train`` split; its ``val``
  split is the file beside it with ``train`` replaced by ``val`` in its name
  (``instances_train2017.json`` -> ``instances_val2017.json``), or the file itself when its name
  holds no ``train`` (evaluating a given file);
- ``yolo``: a ``.yaml``/``.yml`` data file, a folder holding ``data.yaml``, or a folder with
  ``images/`` and ``labels/`` (+ ``classes.txt``; splits ``images/train``, ``images/val``, or the
  whole folder as ``all``).

:func:`check_trainable` stops a training set without any usable object, saying why.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from utils.coco import BadDataset, CocoDataset
from utils.data import VOC_CLASSES, VOCDataset
from utils.voc import load_classes
from utils.yolotxt import YoloDataset, folder_config, load_data_yaml

__all__ = [
    "FORMATS",
    "box_sizes",
    "check_trainable",
    "dataset_classes",
    "detect_format",
    "open_dataset",
    "voc_classes",
    "voc_classes_file",
]

log = logging.getLogger(__name__)

FORMATS = ("voc", "coco", "yolo")
_HINT = (
    "give a VOCdevkit folder, a COCO instances_*.json (or a folder with annotations/), a YOLO "
    "data.yaml (or a folder with images/ and labels/), or pass --data-format voc|coco|yolo"
)


def detect_format(path: str | os.PathLike) -> str:
    """``"voc"``, ``"coco"`` or ``"yolo"`` from what ``path`` is; ValueError saying what to give."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} not found: {_HINT}")
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".json":
            return "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        raise ValueError(f"--data {path} is a {suffix or 'suffix-less'} file: {_HINT}")
    if list(path.glob("annotations/*.json")):
        return "coco"
    if (path / "data.yaml").is_file() or (path / "images").is_dir():
        return "yolo"
    if list(path.glob("VOC*/Annotations")) or (path / "Annotations").is_dir():
        return "voc"
    raise ValueError(f"--data {path}: no VOC, COCO or YOLO layout found in it: {_HINT}")


def _split_token(file: Path) -> str:
    """``instances_train2017.json`` -> ``train2017``: the part of the name that names the split."""
    return file.stem.removeprefix("instances_")


def _names_split(file: Path, split: str) -> bool:
    """The file is ``split``'s: ``train``, ``train2017``, ``val2014`` (not ``trainval``)."""
    token = _split_token(file)
    return token == split or (token.startswith(split) and token[len(split) :].isdigit())


def _coco_file(path: Path, split: str) -> Path:
    """The instances file of ``split`` (``train`` or ``val``): in a folder of COCO's layout,
    ``annotations/instances_<split>[YEAR].json`` (captions and keypoints files aside); beside
    a ``..._train...json`` given, its ``val`` twin; else the file given."""
    if path.is_dir():
        files = sorted((path / "annotations").glob("*.json"))
        instances = [f for f in files if f.name.startswith("instances_")] or files
        named = [f for f in instances if _names_split(f, split)]
        if len(named) != 1:
            raise ValueError(
                f"--data {path}: {len(named)} annotation files are {split!r}'s among "
                f"{[f.name for f in instances]}: keep one annotations/instances_{split}[YEAR].json "
                "or pass the file itself"
            )
        return named[0]
    if split == "val" and _names_split(path, "train"):
        sibling = path.with_name(path.name.replace("train", "val", 1))
        if not sibling.is_file():
            raise FileNotFoundError(
                f"no validation file {sibling} beside --data {path}: put the val instances file "
                f"there (COCO's layout: annotations/instances_{{train,val}}*.json)"
            )
        return sibling
    return path


def _yolo_source(path: Path) -> Path:
    if path.is_dir() and (path / "data.yaml").is_file():
        return path / "data.yaml"
    return path


def open_dataset(
    path, split: str, *, data_format: str | None = None, classes=None, voc_sets=None,
    transform=None, keep_difficult: bool = True, strict: bool = False,
    keep_unreadable: bool = False,
):  # fmt: skip
    """The ``split`` (``train``, ``val``, ...) of the dataset at ``path`` (module docstring).
    ``classes``: names to map objects to (None: VOC's 20 for VOC, the file's own otherwise)."""
    path = Path(path)
    kind = data_format or detect_format(path)
    if kind not in FORMATS:
        raise ValueError(f"--data-format {kind!r}: choose one of {', '.join(FORMATS)}")
    if kind == "coco":
        dataset = CocoDataset(_coco_file(path, split), None, transform, classes=classes,
                              keep_unreadable=keep_unreadable)  # fmt: skip
        return _checked_strict(dataset, strict)
    if kind == "yolo":
        source = _yolo_source(path)
        if path.is_dir() and source == path and split == "train":
            config = folder_config(path)
            split = "train" if "train" in config else "all"  # one folder: kmeans reads it all
        dataset = YoloDataset(source, split, transform, classes=classes,
                              keep_unreadable=keep_unreadable)  # fmt: skip
        return _checked_strict(dataset, strict)
    classes = classes or voc_classes(path)
    if is_voc_set_folder(path):
        path, voc_sets = path.parent, [(path.name[3:], split)]
    return VOCDataset(path, voc_sets or [], classes, keep_difficult, transform,
                      strict=strict, keep_unreadable=keep_unreadable)  # fmt: skip


def _checked_strict(dataset, strict: bool):
    """``--strict``: an object of a class not in the class list stops the run, as for VOC."""
    unknown = dataset.unknown_classes
    if strict and unknown:
        raise ValueError(
            f"{dataset.summary()}: objects of classes not in the class list {dict(unknown)}: add "
            "them to the classes file, or leave out --strict to skip such objects"
        )
    return dataset


def _coco_categories(path: Path) -> list:
    """The ``categories`` list of an instances file, without parsing the whole file when the
    list can be found as the file's last ``"categories"`` key (COCO writes it last)."""
    data = path.read_bytes()
    at = data.rfind(b'"categories"')
    if at >= 0:
        try:
            start = data.index(b"[", at)
            found = json.JSONDecoder().raw_decode(data[start:].decode("utf-8"))[0]
        except (ValueError, UnicodeDecodeError):
            found = None
        if isinstance(found, list) and all(isinstance(c, dict) and "id" in c for c in found):
            return found  # else the text was inside some string: parse the whole file
    try:
        return json.loads(data)["categories"]
    except (ValueError, KeyError, TypeError):
        raise BadDataset(f"{path} is not a COCO instances file: give instances_*.json") from None


def is_voc_set_folder(path) -> bool:
    """``path`` is one ``VOC<NAME>`` folder (its own train and val splits), not a devkit such
    as ``VOCdevkit`` that holds them."""
    path = Path(path)
    return path.name.startswith("VOC") and (path / "Annotations").is_dir()


def voc_classes_file(path) -> Path | None:
    """The ``classes.txt`` of a VOC dataset: in the ``VOC<NAME>`` folder ``path``, else in the
    devkit folder (where ``import_voc.py`` writes it); None when there is none."""
    path = Path(path)
    places = [path, path.parent] if is_voc_set_folder(path) else [path]
    return next((p / "classes.txt" for p in places if (p / "classes.txt").is_file()), None)


def voc_classes(path) -> tuple[str, ...]:
    """A VOC dataset's class names: its ``classes.txt`` (:func:`voc_classes_file`), else VOC's
    20."""
    found = voc_classes_file(path)
    return load_classes(found) if found else VOC_CLASSES


def dataset_classes(path, data_format: str | None = None) -> tuple[str, ...] | None:
    """The class names a dataset defines: a COCO file's categories, a YOLO set's names, a VOC
    set's ``classes.txt`` (None for a VOC set without one: VOC's 20 apply)."""
    path = Path(path)
    kind = data_format or detect_format(path)
    if kind == "coco":
        cats = _coco_categories(_coco_file(path, "train"))
        return tuple(str(c["name"]) for c in sorted(cats, key=lambda c: c["id"]))
    if kind == "yolo":
        source = _yolo_source(path)
        return (folder_config(source) if source.is_dir() else load_data_yaml(source))["names"]
    found = voc_classes_file(path)
    return load_classes(found) if found else None


def _num_objects(dataset) -> int:
    if hasattr(dataset, "num_objects"):
        return dataset.num_objects
    return sum(len(record.labels) for record in dataset.records)


def check_trainable(dataset, classes_file: str | None = None) -> None:
    """ValueError when a training set holds no usable object, naming the likely cause (class
    names that do not match the class list: the closest listed name is shown)."""
    if _num_objects(dataset):
        return
    unknown = dict(getattr(dataset, "unknown_classes", None) or {})
    if not unknown:
        raise ValueError(
            f"the training set has no usable object, nothing to train on: {dataset.summary()}"
        )
    pairs = []
    for name, _ in sorted(unknown.items(), key=lambda item: -item[1])[:3]:
        close = difflib.get_close_matches(name, dataset.classes, n=1, cutoff=0.6)
        pairs.append(f"{name!r} is not {close[0]!r}" if close else f"{name!r} is not listed")
    raise ValueError(
        f"0 of {sum(unknown.values())} objects match a class name in "
        f"{classes_file or 'the class list'}: {'; '.join(pairs)}: fix the names there or in "
        f"the annotations"
    )


def box_sizes(dataset) -> torch.Tensor:
    """float32 ``[M, 2]`` (w, h) of every box of a dataset, fractions of the image."""
    if hasattr(dataset, "num_objects"):
        boxes = dataset.records.boxes
    else:
        boxes = np.concatenate([r.boxes for r in dataset.records] or [np.zeros((0, 4), np.float32)])
    boxes = torch.from_numpy(np.asarray(boxes, np.float32))  # [M, 4]
    return boxes[:, 2:] - boxes[:, :2]
