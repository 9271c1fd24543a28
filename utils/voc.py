"""Pascal VOC files: class and split lists, annotation XML, the VOC pixel frame, image lookup.

The VOC pixel frame: an XML box (xmin, ymin, xmax, ymax) is in 1-based inclusive pixels of a
W x H image, so it covers the continuous span ``[xmin - 1, xmax] x [ymin - 1, ymax]`` and its
normalised box is ``((xmin - 1) / W, (ymin - 1) / H, xmax / W, ymax / H)``. ``xmin == xmax`` is
a 1-pixel-wide object; in this frame the devkit's "+1" widths, areas and IoU are plain
continuous ones. A shape covering the 0-based pixels ``[x0, x1)`` is written
``xmin = x0 + 1, xmax = x1`` and reads back as ``(x0 / W, x1 / W)``.

Text files (classes, ``ImageSets/Main/<split>.txt``) are UTF-8 with or without a byte-order
mark, with CRLF or LF line ends; another encoding is an error naming the file and the fix.
Annotations are parsed with defusedxml: no DTD entities, no external resources.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import defusedxml.ElementTree as SafeET
import numpy as np
import torch
from defusedxml import DefusedXmlException

from utils.images import IMAGE_SUFFIXES

__all__ = [
    "Annotation",
    "BadAnnotation",
    "ImageFolder",
    "VocObject",
    "load_classes",
    "parse_annotation",
    "parse_sets",
    "read_split",
    "read_text_lines",
    "voc_box",
]


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a UTF-8 text file (BOM dropped, CRLF or LF); other encodings raise ValueError."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}): save it as UTF-8 "
            f"(with or without BOM), e.g. in Notepad 'Save as' > Encoding UTF-8"
        ) from None
    return text.splitlines()


def load_classes(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a text file, one per line; blank lines and surrounding spaces ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} not found: write one class name per line")
    names = [name for name in (line.strip() for line in read_text_lines(path)) if name]
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


_SPLIT_FLAGS = ("1", "-1", "0")  # VOC's per-class split files: "<id> 1", "<id> -1", "<id> 0"


def _split_id(path: Path, number: int, line: str) -> str:
    """The image id of one split-file line: the line itself, or the id of a per-class line
    ``<id> <flag>``; an id that is not a plain file stem raises ValueError naming the line."""
    words = line.split()
    image_id = words[0] if len(words) == 2 and words[1] in _SPLIT_FLAGS else line.strip()
    if "/" in image_id or "\\" in image_id or ".." in image_id or ":" in image_id:
        raise ValueError(
            f"{path} line {number}: image id {image_id!r} is not a file stem (it holds a path "
            f"separator, ':' or '..'): list one stem per line, e.g. 000005"
        )
    return image_id


def read_split(path: str | os.PathLike) -> tuple[list[str], Counter[str]]:
    """Image ids of a split file (one id per line, or VOC's per-class ``<id> 1``/``-1``/``0``;
    an id may hold spaces), each once in first-seen order, and how often repeated ids appeared
    (``{id: count}``, empty when there are none). An id with a path separator or ``..`` (it would
    reach files outside the dataset) raises ValueError naming the file and line."""
    path = Path(path)
    lines = read_text_lines(path)
    ids = [_split_id(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    counts = Counter(ids)
    return list(dict.fromkeys(ids)), Counter({i: n for i, n in counts.items() if n > 1})


class BadAnnotation(Exception):
    """The annotation file cannot be trusted; the message says why."""


@dataclass(frozen=True)
class VocObject:
    name: str
    difficult: bool
    corners: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as written (1-based)


@dataclass(frozen=True)
class Annotation:
    filename: str | None  # <filename>, folders stripped; None when absent
    size: tuple[int, int] | None  # <size> (width, height); None when absent or not positive
    objects: tuple[VocObject, ...]


def _size(root) -> tuple[int, int] | None:
    try:
        width, height = (int(float(root.findtext(f"size/{key}"))) for key in ("width", "height"))
    except (TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def _object(node, index: int) -> VocObject:
    name = (node.findtext("name") or "").strip()
    if not name:
        raise BadAnnotation(f"malformed XML (object {index} has no <name>)")
    corners = []
    for key in ("xmin", "ymin", "xmax", "ymax"):
        text = node.findtext(f"bndbox/{key}")
        try:
            corners.append(float(text))
        except (TypeError, ValueError):
            raise BadAnnotation(f"bad coordinates (object {index} {key}={text!r})") from None
    if not all(np.isfinite(corners)):
        raise BadAnnotation(f"bad coordinates (object {index}: {corners})")
    flag = (node.findtext("difficult") or "0").strip()
    if flag not in ("0", "1"):
        raise BadAnnotation(f"malformed XML (object {index} difficult={flag!r}, expected 0 or 1)")
    return VocObject(name, flag == "1", tuple(corners))


def parse_annotation(path: str | os.PathLike) -> Annotation:
    """A VOC XML file; raises BadAnnotation (message: why) when it cannot be trusted."""
    try:
        root = SafeET.parse(path).getroot()
    except FileNotFoundError:
        raise BadAnnotation("missing annotation") from None
    except (SafeET.ParseError, DefusedXmlException, OSError) as error:
        raise BadAnnotation(f"malformed XML ({type(error).__name__}: {error})") from None
    objects = tuple(_object(node, index) for index, node in enumerate(root.iter("object")))
    filename = (root.findtext("filename") or "").strip()
    # labelling tools on Windows may write a path: keep the last component of / or \ paths
    filename = PureWindowsPath(filename).name if filename else None
    return Annotation(filename or None, _size(root), objects)


def voc_box(
    corners: tuple[float, float, float, float], width: int, height: int
) -> tuple[np.ndarray | None, str]:
    """Normalised xyxy ``[4]`` float32 of VOC corners in a ``width`` x ``height`` image (the
    frame of the module docstring), or None when dropped, and a note: ``""``, ``"clamped"``
    (partly outside, clamped to [0, 1]) or why it was dropped (inverted, fully outside)."""
    xmin, ymin, xmax, ymax = corners
    if xmax < xmin or ymax < ymin:
        return None, f"inverted box {corners}, dropped"
    span = np.array([xmin - 1, ymin - 1, xmax, ymax], dtype=np.float64)  # continuous pixels
    limits = np.array([width, height, width, height], dtype=np.float64)
    clamped = np.clip(span, 0.0, limits)
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        return None, f"box {corners} outside the {width}x{height} image, dropped"
    note = "clamped" if not np.array_equal(span, clamped) else ""
    return (clamped / limits).astype(np.float32), note


def boxes_to_voc_pixels(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The inverse of :func:`voc_box`: ``[K, 4]`` normalised xyxy -> ``[K, 4]`` VOC corners of
    a ``width`` x ``height`` image, ``(x1 W + 1, y1 H + 1, x2 W, y2 H)``, 1-based inclusive
    pixels, as VOC XML and result files write them."""
    scale = boxes.new_tensor([width, height, width, height])
    return boxes * scale + boxes.new_tensor([1.0, 1.0, 0.0, 0.0])


class ImageFolder:
    """Finds an annotation's image in one ``JPEGImages`` folder (listed once).

    The XML ``<filename>`` wins when that file exists; else ``<id>`` with the first of
    :data:`utils.images.IMAGE_SUFFIXES` present, in any case (``.JPG`` too).
    """

    def __init__(self, folder: Path):
        self.folder = folder
        names = sorted(os.listdir(folder)) if folder.is_dir() else []
        self._names = set(names)
        self._by_stem: dict[tuple[str, str], str] = {}
        for name in names:
            stem, suffix = os.path.splitext(name)
            self._by_stem.setdefault((stem, suffix.lower()), name)

    def find(self, image_id: str, filename: str | None) -> tuple[Path | None, str]:
        """The image path (None when missing) and, when missing, what was tried."""
        if filename and filename in self._names:
            return self.folder / filename, ""
        for suffix in IMAGE_SUFFIXES:
            name = self._by_stem.get((image_id, suffix))
            if name is not None:
                return self.folder / name, ""
        tried = f"{filename}, " if filename else ""
        suffixes = ",".join(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
        where = f"in {self.folder}, suffixes in any case"
        return None, f"missing image (tried {tried}{image_id}.{{{suffixes}}} {where})"
