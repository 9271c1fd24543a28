"""Labelling-tool output (a folder of images, and a folder of VOC XML, a folder of YOLO-txt
labels with classes.txt, or a COCO instances .json) -> a VOCdevkit-layout dataset.

``import_labelled(images, annotations, out)`` writes, for ``out = data/NAME``::

    data/NAME/VOCNAME/JPEGImages/           the images, copied (or symlinked with link=True)
    data/NAME/VOCNAME/Annotations/<id>.xml  the XML files, copied byte for byte
    data/NAME/VOCNAME/ImageSets/Main/{train,val,trainval}.txt   a seeded split
    data/NAME/classes.txt                   the class names found in the XML, sorted
    data/NAME/import.json                   the parameters and counts (marks a previous import)
    data/NAME/import_report.txt             what was skipped and why

so that ``VOCDataset("data/NAME", [("NAME", "train")], load_classes("data/NAME/classes.txt"))``
reads it. An XML file is paired with the image its ``<filename>`` names, else with the image of
its own stem (.jpg/.jpeg/.png/.bmp, any case); its id is its stem (spaces become ``_``, since
split files hold one word per line). Skipped and reported: an image without XML, an XML without
image, a malformed XML, an unreadable image, an image claimed by two XML files. The user's files
are only read; the new folder is built beside ``out`` and renamed into place, replacing ``out``
only when it is empty or a previous import. YOLO-txt and COCO sources (:mod:`utils.foreign`)
are written as VOC XML; an annotations path of another kind is an error naming what was found
and what to pass.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from utils.foreign import annotation_format, read_foreign
from utils.images import IMAGE_SUFFIXES, UnreadableImage, probe_image
from utils.voc import Annotation, BadAnnotation, parse_annotation, voc_box

__all__ = ["MANIFEST", "REPORT", "ImportResult", "import_labelled", "report_text"]

log = logging.getLogger(__name__)

MANIFEST = "import.json"
REPORT = "import_report.txt"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ImportResult:
    out: Path
    name: str  # the set name: sets NAME:train, NAME:val, NAME:trainval
    classes: tuple[str, ...]
    splits: dict[str, list[str]]  # split -> image ids
    num_objects: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # kept, but worth a look


@dataclass(frozen=True)
class _Pair:
    image_id: str
    xml: Path  # the source annotation file (for COCO/YOLO-txt: the JSON or .txt file)
    image: Path
    out_name: str  # file name in JPEGImages
    annotation: Annotation
    size: tuple[int, int]  # (width, height) of the upright image
    xml_text: str = ""  # the XML to write, converted from COCO/YOLO-txt ("": copy ``xml``)


def _check_out(out: Path, sources: tuple[Path, Path]) -> None:
    """ValueError unless ``out`` is new, empty or a previous import, apart from the sources."""
    if not _NAME.fullmatch(out.name):
        raise ValueError(
            f"--out {out}: its last folder name is the set name: use letters, digits, '_', '-' "
            f"or '.', e.g. data/raccoon"
        )
    resolved = out.resolve()
    for source in sources:
        if source.resolve().is_relative_to(resolved) or resolved.is_relative_to(source.resolve()):
            raise ValueError(f"--out {out} overlaps {source}: choose a folder apart, e.g. data/")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: choose a folder")
    entries = set(os.listdir(out)) if out.is_dir() else set()
    ours = {MANIFEST, REPORT, "classes.txt", f"VOC{out.name}"}
    if entries and not (MANIFEST in entries and entries <= ours):
        raise ValueError(
            f"--out {out} is not empty and not a previous import ({MANIFEST} missing or other "
            f"files there): choose a new folder; to redo an import, give its folder again"
        )


def _list_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder} not found: give the folder that holds them"
        )
    return sorted(path for path in folder.iterdir() if path.is_file())


def _find_image(xml: Path, annotation: Annotation, images: dict[str, Path]):
    """``(image, by_filename)`` or ``(None, what was tried)``."""
    if annotation.filename and annotation.filename in images:
        return images[annotation.filename], True
    by_stem = {(path.stem, path.suffix.lower()): path for path in images.values()}
    for suffix in IMAGE_SUFFIXES:
        if (xml.stem, suffix) in by_stem:
            return by_stem[(xml.stem, suffix)], False
    tried = f"<filename> {annotation.filename}, " if annotation.filename else ""
    return None, f"no image: tried {tried}{xml.stem}.{{jpg,jpeg,png,bmp}} in any case"


def _pair(xml: Path, images: dict[str, Path], taken: dict[str, str], found: set) -> _Pair | str:
    """The pair of one XML file, or why it is skipped; ``found`` collects the images named."""
    try:
        annotation = parse_annotation(xml)
    except BadAnnotation as error:
        return str(error)
    image, how = _find_image(xml, annotation, images)
    if image is None:
        return how
    found.add(image.name)
    image_id = re.sub(r"\s+", "_", xml.stem)
    out_name = image.name if how else f"{image_id}{image.suffix}"
    for key, what in ((image.name, "image"), (image_id, "id"), (out_name, "file name")):
        if key in taken:
            return f"its {what} {key} is already used by {taken[key]}"
    try:
        size = probe_image(image)
    except UnreadableImage as error:
        return f"its image {image.name}: {error.reason}"
    for key in {image.name, image_id, out_name}:
        taken[key] = xml.name
    return _Pair(image_id, xml, image, out_name, annotation, size)


def _collect(images_dir: Path, annotations_dir: Path, result: ImportResult) -> list[_Pair]:
    files = _list_files(images_dir, "images")
    images = {path.name: path for path in files if path.suffix.lower() in IMAGE_SUFFIXES}
    pairs, taken, found = [], {}, set()
    for path in _list_files(annotations_dir, "annotations"):
        if path.suffix.lower() != ".xml":
            result.skipped.append((str(path), "not an .xml file"))
            continue
        pair = _pair(path, images, taken, found)
        if isinstance(pair, str):
            result.skipped.append((str(path), pair))
            continue
        pairs.append(pair)
    for pair in pairs:  # the dataset looks up <filename> first: it must not name another image
        named = pair.annotation.filename
        if named and named != pair.out_name and named in {p.out_name for p in pairs}:
            result.skipped.append((str(pair.xml), f"its <filename> {named} is another image"))
    skipped = {file for file, _ in result.skipped}
    pairs = [pair for pair in pairs if str(pair.xml) not in skipped]
    for name in sorted(set(images) - found):
        result.skipped.append((str(images[name]), "no XML names it or shares its stem"))
    return pairs


def _collect_foreign(kind: str, images: Path, annotations: Path, result) -> list[_Pair]:
    """Pairs of a COCO JSON or a YOLO-txt folder, their annotations converted to VOC XML."""
    items, _, skipped = read_foreign(kind, images, annotations)
    result.skipped += skipped
    pairs, taken = [], {}
    for item in items:
        image_id = re.sub(r"\s+", "_", item.image.stem)
        if image_id in taken:
            result.skipped.append((str(item.image), f"its id {image_id} is already used by "
                                   f"{taken[image_id]}"))  # fmt: skip
            continue
        taken[image_id] = item.image.name
        source = annotations if kind == "coco" else annotations / f"{item.image.stem}.txt"
        pairs.append(_Pair(image_id, source, item.image, f"{image_id}{item.image.suffix}",
                           item.annotation, item.size, item.xml_text))  # fmt: skip
    return pairs


def _check_boxes(pair: _Pair, result: ImportResult) -> None:
    """Notes for boxes the dataset will clamp or drop (the XML is never edited)."""
    for index, obj in enumerate(pair.annotation.objects):
        _, note = voc_box(obj.corners, *pair.size)
        if note:
            result.notes.append((str(pair.xml), f"object {index} ({obj.name}): {note}"))
    if not pair.annotation.objects:
        result.notes.append((str(pair.xml), "no objects: kept as a background image"))


def _split(ids: list[str], val: float, seed: int) -> dict[str, list[str]]:
    """Seeded split of the sorted ids: at least one image in each of train and val."""
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} usable image pairs: a train/val split needs at least 2")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    num_val = min(len(ids) - 1, max(1, round(val * len(ids))))
    return {
        "train": sorted(order[num_val:]),
        "val": sorted(order[:num_val]),
        "trainval": sorted(ids),
    }


def _write(staging: Path, pairs: list[_Pair], result: ImportResult, link: bool) -> None:
    folder = staging / f"VOC{result.name}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True)
    for pair in pairs:
        target = folder / "JPEGImages" / pair.out_name
        if link:
            os.symlink(pair.image.resolve(), target)
        else:
            shutil.copyfile(pair.image, target)
        target = folder / "Annotations" / f"{pair.image_id}.xml"
        if pair.xml_text:
            target.write_text(pair.xml_text, encoding="utf-8")
        else:
            shutil.copyfile(pair.xml, target)
    for split, ids in result.splits.items():
        text = "".join(f"{image_id}\n" for image_id in ids)
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text(text, encoding="utf-8")
    (staging / "classes.txt").write_text("".join(f"{c}\n" for c in result.classes), "utf-8")
    (staging / REPORT).write_text(report_text(result), encoding="utf-8")


def report_text(result: ImportResult) -> str:
    """The report: counts, then one line per skipped file and per note."""
    lines = [
        f"{len(result.splits['trainval'])} images ({len(result.splits['train'])} train, "
        f"{len(result.splits['val'])} val), {result.num_objects} objects, "
        f"{len(result.classes)} {'class' if len(result.classes) == 1 else 'classes'}: "
        f"{', '.join(result.classes)}",
        f"{len(result.skipped)} files skipped, {len(result.notes)} notes",
    ]
    lines += [f"skipped {file}: {reason}" for file, reason in result.skipped]
    lines += [f"note {file}: {reason}" for file, reason in result.notes]
    return "\n".join(lines) + "\n"


def import_labelled(
    images: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val: float = 0.2,
    seed: int = 0,
    link: bool = False,
) -> ImportResult:
    """Import a labelling tool's images and VOC XML into ``out`` (module docstring)."""
    images, annotations, out = Path(images), Path(annotations), Path(out)
    if not 0.0 < val < 1.0:
        raise ValueError(f"--val {val}: give the validation share, between 0 and 1 (e.g. 0.2)")
    _check_out(out, (images, annotations))
    result = ImportResult(out, out.name, (), {}, 0)
    _list_files(images, "images")  # a missing images folder is named first
    kind = annotation_format(annotations)
    if kind == "voc":
        pairs = _collect(images, annotations, result)
    else:
        pairs = _collect_foreign(kind, images, annotations, result)
    for pair in pairs:
        _check_boxes(pair, result)
    names = {obj.name for pair in pairs for obj in pair.annotation.objects}
    if not names:
        what = {"voc": "XML", "coco": "image of", "yolo": "label file of"}[kind]
        raise ValueError(f"no object in any usable {what} {annotations}: nothing to train on")
    result.classes = tuple(sorted(names))
    result.num_objects = sum(len(pair.annotation.objects) for pair in pairs)
    result.splits = _split([pair.image_id for pair in pairs], val, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.import-"))
    try:
        _write(staging, pairs, result, link)
        manifest = {
            "images": str(images.resolve()),
            "annotations": str(annotations.resolve()),
            "val": val,
            "seed": seed,
            "link": link,
            "classes": list(result.classes),
            "counts": {split: len(ids) for split, ids in result.splits.items()},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
        if out.exists():
            shutil.rmtree(out)  # empty or a previous import: checked by _check_out
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
