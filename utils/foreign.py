"""COCO JSON and YOLO-txt labelling output read for the importer, as VOC annotations.

:func:`annotation_format` names what an ``--annotations`` path holds (``voc``: a folder of XML,
``coco``: an instances JSON file, ``yolo``: a folder of ``.txt`` label files), and says what to
pass when it is none of them. :func:`read_foreign` reads a COCO or YOLO-txt source into one
:class:`ForeignImage` per image: its file, its upright size and its objects as VOC
:class:`utils.voc.Annotation` (corners in VOC's 1-based pixel frame: a normalised box
``(x1, y1, x2, y2)`` is ``(x1 W + 1, y1 H + 1, x2 W, y2 H)``) with the XML text to write.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from utils.coco import scan_coco
from utils.images import UnreadableImage, probe_image
from utils.records import FlatRecords
from utils.voc import Annotation, VocObject, load_classes
from utils.yolotxt import scan_yolo

__all__ = ["ForeignImage", "annotation_format", "read_foreign", "voc_xml"]


@dataclass(frozen=True)
class ForeignImage:
    image: Path
    size: tuple[int, int]  # (width, height) of the upright image
    annotation: Annotation
    xml_text: str


def _count(folder: Path) -> Counter:
    return Counter(p.suffix.lower() for p in folder.iterdir() if p.is_file())


def annotation_format(annotations: str | os.PathLike) -> str:
    """``"voc"``, ``"coco"`` or ``"yolo"``; ValueError naming what was found and what to pass."""
    path = Path(annotations)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        raise ValueError(
            f"--annotations {path} is a {path.suffix or 'suffix-less'} file: give a folder of VOC "
            f"XML or YOLO-txt label files, or a COCO instances .json file"
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"annotations {path} not found: give the folder of XML or .txt labels, or the .json"
        )
    found = _count(path)
    labels = found[".txt"] - int((path / "classes.txt").is_file())
    if found[".xml"] >= max(labels, 1):
        return "voc"
    if labels > 0:
        return "yolo"
    jsons = sorted(path.glob("*.json"))
    if jsons:
        raise ValueError(
            f"found .json files in {path}: COCO? pass the file itself: --annotations {jsons[0]}"
        )
    shown = ", ".join(f"{n} {s or 'suffix-less'}" for s, n in found.most_common(3)) or "nothing"
    raise ValueError(
        f"no .xml (VOC), .txt (YOLO-txt) or .json (COCO) annotations in {path} (found {shown}): "
        f"give the folder the labelling tool wrote"
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def voc_xml(annotation: Annotation) -> str:
    """The VOC XML text of an annotation (``<filename>``, ``<size>``, objects)."""
    width, height = annotation.size
    parts = [
        "<annotation>",
        f"  <filename>{escape(annotation.filename)}</filename>",
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for obj in annotation.objects:
        box = "".join(
            f"<{k}>{_number(v)}</{k}>"
            for k, v in zip(("xmin", "ymin", "xmax", "ymax"), obj.corners, strict=True)
        )
        parts.append(f"  <object><name>{escape(obj.name)}</name><difficult>0</difficult>"
                     f"<bndbox>{box}</bndbox></object>")  # fmt: skip
    return "\n".join([*parts, "</annotation>"]) + "\n"


def _yolo_records(images: Path, labels: Path):
    classes_file = next((p for p in (labels / "classes.txt", labels.parent / "classes.txt")
                         if p.is_file()), None)  # fmt: skip
    if classes_file is None:
        raise FileNotFoundError(
            f"found .txt label files in {labels}: YOLO-txt; its class names are missing: write "
            f"{labels / 'classes.txt'} (one name per line, line i naming class i) and import again"
        )
    config = {"root": images, "names": load_classes(classes_file), "file": classes_file,
              "all": str(images)}  # fmt: skip
    records, classes, skips = scan_yolo(config, "all", labels_dir=labels)
    return records, classes, skips


def read_foreign(kind: str, images: Path, annotations: Path):
    """``(items, classes, skipped)``: one :class:`ForeignImage` per readable image, the class
    names, and ``(file, reason)`` per skipped kind or image."""
    if kind == "coco":
        records, classes, _, skips = scan_coco(annotations, images)
    else:
        records, classes, skips = _yolo_records(images, annotations)
    skipped = [(example, f"{kind_}: {n}") for kind_, n in skips.counts.items()
               for example in [skips.examples[kind_][0]]]  # fmt: skip
    if len(records.crowd_labels):
        skipped.append((str(annotations), f"crowd regions: {len(records.crowd_labels)} not "
                        f"imported (VOC has none)"))  # fmt: skip
    items = []
    for index in range(len(records.paths)):
        item = _item(records, classes, index)
        if isinstance(item, str):
            skipped.append((os.fsdecode(records.paths[index]), item))
        else:
            items.append(item)
    return items, classes, skipped


def _item(records: FlatRecords, classes, index: int) -> ForeignImage | str:
    image = Path(os.fsdecode(records.paths[index]))
    try:
        width, height = probe_image(image)
    except UnreadableImage as error:
        return error.reason
    start, stop = records.offsets[index], records.offsets[index + 1]
    scale = np.array([width, height, width, height], np.float64)
    corners = records.boxes[start:stop].astype(np.float64) * scale + [1.0, 1.0, 0.0, 0.0]
    objects = tuple(VocObject(classes[label], False, tuple(box))
                    for label, box in zip(records.labels[start:stop].tolist(), corners.tolist(),
                                          strict=True))  # fmt: skip
    annotation = Annotation(image.name, (width, height), objects)
    return ForeignImage(image, (width, height), annotation, voc_xml(annotation))
