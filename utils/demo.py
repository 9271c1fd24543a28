"""A small synthetic detection dataset in the VOCdevkit layout: the default of ``make demo``.

``generate_demo_dataset(root)`` writes ``root/VOCdemo/{JPEGImages,Annotations,ImageSets/Main}``
(sets ``demo:train``, ``demo:val``, ``demo:trainval``) and ``root/demo_classes.txt``. Images
hold 0-5 filled shapes of ``DEMO_CLASSES`` with varied sizes (0.15 to 0.55 of the image's short
side), aspect ratios, colours, partial overlaps and backgrounds (solid, gradient, smooth
noise), so that anchors and the loss matter while a small model still learns it in minutes on
a CPU. Objects that are very small, mostly hidden or faint (a colour close to their background;
about 6% of them) are marked difficult, as VOC does.

Deterministic: each image comes from ``numpy.random.default_rng([seed, index])``, so the files
are byte-identical for the same parameters (and the same Pillow/libjpeg). Idempotent: a
``manifest.json`` records the parameters; the same call again does nothing, other parameters
regenerate the folder (never a folder without that manifest).

CLI: ``python -m utils.demo --root data/demo``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DEMO_CLASSES", "DEMO_CLASSES_FILE", "generate_demo_dataset", "main"]

log = logging.getLogger(__name__)

DEMO_CLASSES = ("circle", "square", "triangle", "cross", "ring")
DEMO_CLASSES_FILE = "demo_classes.txt"  # in the dataset's root
_FORMAT_VERSION = 2
_MIN_SIDE, _MAX_SIDE = 0.15, 0.55  # object side, log-uniform, as a fraction of the short side
_MAX_OBJECTS = 5
_MAX_OVERLAP = 0.4  # intersection over the smaller box's area allowed between two objects
_DIFFICULT_SIDE_PX = 12  # objects narrower or lower than this are difficult
_DIFFICULT_VISIBLE = 0.4  # objects with less of their area visible are difficult
_FAINT_P = 0.06  # share of objects drawn in a colour close to their background (difficult)


def _hsv_colour(rng: np.random.Generator, saturation: tuple[float, float]) -> np.ndarray:
    """A random RGB colour (float [3] in 0..255) with HSV saturation in the given range."""
    hue = rng.uniform(0.0, 1.0)
    sat = rng.uniform(*saturation)
    val = rng.uniform(0.35, 1.0)
    sector = hue * 6.0
    k = (np.array([5.0, 3.0, 1.0]) + sector) % 6.0
    weight = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return 255.0 * val * (1.0 - sat * weight)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """``[H, W, 3]`` float background: solid, linear gradient or smooth noise, plus grain."""
    kind = rng.integers(3)
    base = _hsv_colour(rng, (0.0, 0.5))
    if kind == 0:
        image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    elif kind == 1:
        other = _hsv_colour(rng, (0.0, 0.6))
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)  # [H, W] each
        ramp = xs * math.cos(angle) / width + ys * math.sin(angle) / height
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)  # [H, W]
        image = base + ramp[..., None] * (other - base)  # [H, W, 3]
    else:
        coarse = rng.uniform(-45, 45, size=(height // 24 + 2, width // 24 + 2, 3))
        blobs = Image.fromarray(np.uint8(coarse + 128)).resize((width, height), Image.BICUBIC)
        image = base + np.asarray(blobs, dtype=np.float32) - 128.0  # [H, W, 3]
    grain = rng.normal(0.0, 5.0, size=(height, width, 1)).astype(np.float32)  # [H, W, 1]
    return np.clip(image + grain, 0, 255)


def _shape_mask(label: int, width: int, height: int) -> Image.Image:
    """A ``width x height`` mode-L mask of shape ``DEMO_CLASSES[label]`` touching all 4 sides."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    right, bottom = width - 1, height - 1
    name = DEMO_CLASSES[label]
    if name == "circle":
        draw.ellipse((0, 0, right, bottom), fill=255)
    elif name == "square":
        draw.rectangle((0, 0, right, bottom), fill=255)
    elif name == "triangle":
        draw.polygon([(0, bottom), (right, bottom), (right / 2, 0)], fill=255)
    elif name == "cross":
        bar_w, bar_h = max(2, round(width * 0.32)), max(2, round(height * 0.32))
        left, top = (width - bar_w) // 2, (height - bar_h) // 2
        draw.rectangle((left, 0, left + bar_w - 1, bottom), fill=255)
        draw.rectangle((0, top, right, top + bar_h - 1), fill=255)
    else:  # ring
        draw.ellipse(
            (0, 0, right, bottom), outline=255, width=max(2, round(min(width, height) / 5))
        )
    return mask


def _place(rng, width: int, height: int, boxes: list) -> tuple[int, int, int, int] | None:
    """A box ``(x0, y0, x1, y1)`` (pixels, exclusive end) overlapping others at most a little."""
    short = min(width, height)
    for _ in range(20):
        side = short * math.exp(rng.uniform(math.log(_MIN_SIDE), math.log(_MAX_SIDE)))
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))
        box_w = int(np.clip(side * math.sqrt(aspect), 6, 0.6 * width))
        box_h = int(np.clip(side / math.sqrt(aspect), 6, 0.6 * height))
        x0 = int(rng.integers(0, width - box_w + 1))
        y0 = int(rng.integers(0, height - box_h + 1))
        box = (x0, y0, x0 + box_w, y0 + box_h)
        if all(_overlap(box, other) <= _MAX_OVERLAP for other in boxes):
            return box
    return None


def _overlap(a, b) -> float:
    """Intersection over the smaller area of two pixel boxes."""
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter_w * inter_h / smaller


def _render(rng: np.random.Generator, width: int, height: int):
    """One image (PIL RGB) and its objects: dicts with label, box (pixels), difficult."""
    background = _background(rng, width, height)
    canvas = Image.fromarray(np.uint8(np.rint(background)))
    owner = np.full((height, width), -1, dtype=np.int16)  # [H, W] object on top of each pixel
    count = 0 if rng.random() < 0.06 else int(rng.integers(1, _MAX_OBJECTS + 1))
    objects, areas = [], []
    for index in range(count):
        box = _place(rng, width, height, [obj["box"] for obj in objects])
        if box is None:
            continue
        x0, y0, x1, y1 = box
        label = int(rng.integers(len(DEMO_CLASSES)))
        mask = _shape_mask(label, x1 - x0, y1 - y0)
        local = background[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        colour = _hsv_colour(rng, (0.55, 1.0))
        for _ in range(10):  # keep the shape visible against its background
            if np.abs(colour - local).sum() >= 120:
                break
            colour = _hsv_colour(rng, (0.55, 1.0))
        faint = rng.random() < _FAINT_P
        if faint:  # hard to see: most of the way to its background
            colour = local + (colour - local) * 0.25
        fill = Image.new("RGB", mask.size, tuple(round(float(c)) for c in colour))
        canvas.paste(fill, (x0, y0), mask)
        pixels = np.asarray(mask) > 0  # [h, w]
        owner[y0:y1, x0:x1][pixels] = index
        areas.append((index, int(pixels.sum())))
        objects.append({"label": label, "box": box, "index": index, "faint": faint})
    for obj, (index, area) in zip(objects, areas, strict=True):
        visible = int((owner == index).sum()) / max(area, 1)
        x0, y0, x1, y1 = obj["box"]
        small = min(x1 - x0, y1 - y0) < _DIFFICULT_SIDE_PX
        obj["difficult"] = bool(small or obj["faint"] or visible < _DIFFICULT_VISIBLE)
    return canvas, objects


def _annotation_xml(image_id: str, width: int, height: int, objects: list) -> str:
    """VOC XML text; corners 1-based inclusive as VOC writes them: a shape on the 0-based pixels
    ``[x0, x1)`` is ``xmin = x0 + 1, xmax = x1``, which the VOC pixel frame (:mod:`utils.voc`)
    reads back as ``(x0 / W, x1 / W)``."""
    parts = [
        "<annotation>",
        "  <folder>VOCdemo</folder>",
        f"  <filename>{image_id}.jpg</filename>",
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        parts += [
            "  <object>",
            f"    <name>{DEMO_CLASSES[obj['label']]}</name>",
            "    <pose>Unspecified</pose>",
            "    <truncated>0</truncated>",
            f"    <difficult>{int(obj['difficult'])}</difficult>",
            f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>\n")
    return "\n".join(parts)


def _write_folder(folder: Path, params: dict) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    total = params["num_train"] + params["num_val"]
    ids = [f"{index:06d}" for index in range(total)]
    for index, image_id in enumerate(ids):
        rng = np.random.default_rng([params["seed"], index])
        width = int(rng.integers(params["min_size"], params["max_size"] + 1))
        height = int(rng.integers(params["min_size"], params["max_size"] + 1))
        image, objects = _render(rng, width, height)
        image.save(folder / "JPEGImages" / f"{image_id}.jpg", quality=90)
        text = _annotation_xml(image_id, width, height, objects)
        (folder / "Annotations" / f"{image_id}.xml").write_text(text, encoding="utf-8")
    splits = {"train": ids[: params["num_train"]], "val": ids[params["num_train"] :]}
    splits["trainval"] = ids
    for split, members in splits.items():
        lines = "".join(f"{image_id}\n" for image_id in members)
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text(lines, encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


def generate_demo_dataset(
    root: str | os.PathLike,
    *,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 320,
) -> Path:
    """Write the demo dataset under ``root`` (see the module docstring) and return ``root``."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if not 64 <= min_size <= max_size:
        raise ValueError(f"need 64 <= min_size <= max_size, got {min_size}, {max_size}")
    root = Path(root)
    folder, classes_file = root / "VOCdemo", root / DEMO_CLASSES_FILE
    params = {
        "format_version": _FORMAT_VERSION,
        "classes": list(DEMO_CLASSES),
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "min_size": min_size,
        "max_size": max_size,
    }
    manifest = folder / "manifest.json"
    if (
        manifest.is_file()
        and classes_file.is_file()
        and json.loads(manifest.read_text(encoding="utf-8")) == params
    ):
        return root
    if folder.exists() and not manifest.is_file():
        raise FileExistsError(
            f"{folder} exists but was not written by utils.demo (no manifest.json): move it "
            f"away or pick another root; it is left untouched"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".VOCdemo-"))
    try:
        _write_folder(staging, params)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    classes_file.write_text("".join(f"{name}\n" for name in DEMO_CLASSES), encoding="utf-8")
    log.info("demo dataset (%d train, %d val images) written to %s", num_train, num_val, folder)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--root", default="data/demo", help="folder to write VOCdemo/ into")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=160, help="smallest image side, pixels")
    parser.add_argument("--max-size", type=int, default=320, help="largest image side, pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = generate_demo_dataset(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
    )
    classes_file = root / DEMO_CLASSES_FILE
    log.info("demo dataset ready in %s (sets demo:train, demo:val; classes %s)", root, classes_file)


if __name__ == "__main__":
    main()
