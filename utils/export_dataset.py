"""A VOCdevkit dataset -> COCO instances JSON or YOLO-txt, with the same boxes.

``python -m utils.export_dataset --to coco --data-root data/demo --sets demo:train demo:val
--classes data/demo/demo_classes.txt --out data/demo-coco`` writes, per set ``NAME:SPLIT``:

- COCO: ``OUT/annotations/instances_SPLIT.json`` and the images in ``OUT/SPLIT/``;
- YOLO: ``OUT/images/SPLIT/``, ``OUT/labels/SPLIT/<stem>.txt`` and ``OUT/data.yaml``.

The images are those :class:`utils.data.VOCDataset` reads (copied, or symlinked with
``--link``); its boxes are written so that :class:`utils.data.CocoDataset` and
:class:`utils.data.YoloDataset` read back the same targets: a VOC box (xmin, ymin, xmax, ymax)
is the COCO bbox ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` in the image's
pixels, and a YOLO line holds the dataset's clamped normalised box as ``c cx cy w h`` written
with ``repr`` (every digit of a float64, so it reads back to the same float32). Neither format
has VOC's difficult flag: difficult objects are written as plain ones. The source is only read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from utils.data import VOC_CLASSES, VOCDataset
from utils.voc import load_classes, parse_annotation, parse_sets

__all__ = ["export_coco", "export_yolo", "main"]

log = logging.getLogger(__name__)


def _place(source: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(source.resolve(), target)
    else:
        shutil.copyfile(source, target)


def _coco_document(dataset: VOCDataset, name: str) -> dict:
    images, annotations = [], []
    folder = dataset.root / f"VOC{name}"
    index = {c: i for i, c in enumerate(dataset.classes)}
    for number, record in enumerate(dataset.records, 1):
        images.append({"id": number, "file_name": record.image_path.name,
                       "width": record.width, "height": record.height})  # fmt: skip
        annotation = parse_annotation(folder / "Annotations" / f"{record.image_id}.xml")
        for obj in annotation.objects:
            if obj.name not in index:
                continue
            xmin, ymin, xmax, ymax = obj.corners
            w, h = xmax - xmin + 1, ymax - ymin + 1
            annotations.append({"id": len(annotations) + 1, "image_id": number,
                                "category_id": index[obj.name] + 1, "iscrowd": 0,
                                "bbox": [xmin - 1, ymin - 1, w, h], "area": w * h})  # fmt: skip
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(dataset.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def export_coco(root, sets, classes, out, *, link: bool = False) -> list[Path]:
    """One ``instances_SPLIT.json`` (+ ``SPLIT/`` images) per VOC set; returns the JSON paths."""
    out, written = Path(out), []
    for name, split in sets:
        dataset = VOCDataset(root, [(name, split)], classes)
        for record in dataset.records:
            _place(record.image_path, out / split / record.image_path.name, link)
        path = out / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_coco_document(dataset, name)), encoding="utf-8")
        written.append(path)
    return written


def _yolo_lines(boxes: np.ndarray, labels: np.ndarray) -> str:
    """``c cx cy w h`` lines of ``[G, 4]`` float32 normalised xyxy boxes, full precision."""
    lines = []
    corners = boxes.astype(np.float64).tolist()
    for (x1, y1, x2, y2), label in zip(corners, labels.tolist(), strict=True):
        values = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
        lines.append(" ".join([str(label), *map(repr, values)]) + "\n")
    return "".join(lines)


def export_yolo(root, sets, classes, out, *, link: bool = False) -> Path:
    """``images/SPLIT``, ``labels/SPLIT`` per VOC set and ``data.yaml``; returns its path."""
    out = Path(out)
    for name, split in sets:
        dataset = VOCDataset(root, [(name, split)], classes)
        for record in dataset.records:
            _place(record.image_path, out / "images" / split / record.image_path.name, link)
            label = out / "labels" / split / f"{record.image_path.stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(_yolo_lines(record.boxes, record.labels), encoding="utf-8")
    names = "".join(f"  {i}: {json.dumps(c)}\n" for i, c in enumerate(classes))
    splits = "".join(f"{split}: images/{split}\n" for _, split in sets)
    path = out / "data.yaml"
    path.write_text(f"path: .\n{splits}names:\n{names}", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--to", choices=("coco", "yolo"), required=True, help="output format")
    parser.add_argument("--data-root", required=True, help="VOCdevkit folder")
    parser.add_argument("--sets", nargs="+", required=True, help="NAME:SPLIT ... to export")
    parser.add_argument("--classes", help="classes file (default: VOC's 20)")
    parser.add_argument("--out", required=True, help="new output folder")
    parser.add_argument("--link", action="store_true", help="symlink the images, not copy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        log.error("--out %s is not empty: choose a new folder", out)
        return 2
    try:
        classes = load_classes(args.classes) if args.classes else VOC_CLASSES
        export = export_coco if args.to == "coco" else export_yolo
        result = export(args.data_root, parse_sets(args.sets), classes, out, link=args.link)
    except (OSError, ValueError) as error:
        log.error("%s", error)
        return 2
    log.info("wrote %s; train with --data %s", result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
