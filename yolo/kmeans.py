"""Anchor search by k-means on the training boxes' shapes: the engine of ``kmeans.py``.

Reads the (width, height) of every training box of a VOC-format dataset as fractions of the
image (:func:`utils.anchors.read_voc_box_sizes`: the dataset's targets, difficult boxes left
out unless asked, as darknet's ``voc_label.py``), runs :func:`utils.kmeans.run_kmeans`
(distance 1 - IoU, k-means++ restarts) for each requested k, and converts the anchors to
cells of the grid of a reference input size ``img_size`` (416: 13 cells, as darknet's cfg):
fraction * img_size / 32. Writes into ``out_dir``:

- ``anchors-K.json`` for every k: an anchor file (``{"unit": "grid", "stride": 32,
  "anchors": ...}`` plus ``img_size``, ``mean_iou`` and ``darknet_cfg``) for ``--anchors``;
- ``clusters-K.png`` for every k: the boxes coloured by their anchor, in pixels at img_size;
- ``iou_vs_k.png`` when there is more than one k: mean IoU against k, with the paper's points;
- ``kmeans.json``: per k the mean IoU, the anchors in grid cells and as fractions of the
  image, and darknet's cfg line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from utils.anchors import STRIDE, default_anchors, read_voc_box_sizes, save_anchors
from utils.boxes import wh_iou
from utils.demo import DEMO_CLASSES, generate_demo_dataset
from utils.fileio import atomic_write_text
from utils.formats import box_sizes, check_trainable, open_dataset, voc_classes
from utils.kmeans import KMeansResult, run_kmeans
from utils.visualize import PAPER_CLUSTER_IOU, plot_anchor_clusters, plot_iou_vs_k, save_figure
from utils.voc import load_classes, parse_sets
from yolo.config import DEMO_ROOT, KMeansConfig, parse_k
from yolo.flags import config_to_dict

log = logging.getLogger(__name__)

SUMMARY_NAME = "kmeans.json"


def resolve_dataset(config: KMeansConfig) -> tuple[Path, list[tuple[str, str]], tuple[str, ...]]:
    """``(root, sets, classes)`` to read; with ``--demo`` the demo dataset's train split."""
    if config.demo:
        root = generate_demo_dataset(DEMO_ROOT)
        log.info("--demo: clustering the boxes of %s, set demo:train", root)
        return Path(root), [("demo", "train")], DEMO_CLASSES
    classes = load_classes(config.classes) if config.classes else voc_classes(config.data_root)
    return Path(config.data_root), parse_sets(config.sets), classes


def read_data_box_sizes(config: KMeansConfig) -> torch.Tensor:
    """``[M, 2]`` (w, h) fractions of the boxes of ``--data`` (any format), its train split
    (VOC: ``--sets``); ``--classes`` picks classes by name (default: the dataset's own)."""
    classes = load_classes(config.classes) if config.classes else None
    dataset = open_dataset(
        config.data, "train", data_format=config.data_format, classes=classes,
        voc_sets=parse_sets(config.sets), keep_difficult=config.keep_difficult,
        strict=config.strict,
    )  # fmt: skip
    log.info("boxes of %s", dataset.summary())
    check_trainable(dataset, config.classes)
    return box_sizes(dataset)


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with ``num_threads`` torch CPU threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def darknet_anchor_line(anchors_grid: torch.Tensor) -> str:
    """darknet's cfg ``anchors = w1,h1, w2,h2, ...`` line for ``[A, 2]`` anchors in grid cells."""
    return "anchors = " + ", ".join(f"{w:.6g},{h:.6g}" for w, h in anchors_grid.tolist())


def anchor_shares(wh: torch.Tensor, anchors: torch.Tensor) -> tuple[list[float], float]:
    """Share of the boxes ``wh`` ``[M, 2]`` whose best-IoU anchor (ties to the first) is each of
    ``anchors`` ``[A, 2]`` (same unit), and the boxes' mean best IoU: how the loss would spread
    these boxes over the predictors, and how well the anchors fit them."""
    iou = wh_iou(wh[:, None], anchors[None])  # [M, A]
    best = iou.max(dim=1)
    counts = torch.bincount(best.indices, minlength=len(anchors))
    return (counts / len(wh)).tolist(), float(best.values.mean())


def summarise(result: KMeansResult, anchors_grid: torch.Tensor, k: int, shares: list) -> dict:
    """One k's entry of ``kmeans.json``: plain JSON-able data."""
    return {
        "k": k,
        "mean_iou": result.mean_iou,
        "box_share": shares,
        "anchors_grid": anchors_grid.tolist(),
        "anchors_fraction": result.anchors.tolist(),
        "darknet_cfg": darknet_anchor_line(anchors_grid),
        "anchors_file": f"anchors-{k}.json",
        "restart_ious": [round(iou, 6) for iou in result.restart_ious.tolist()],
        "iterations": result.iterations.tolist(),
    }


def format_kmeans_table(entries: list[dict], img_size: int) -> str:
    """The log's table: k, mean IoU in %, the paper's value where it has one, and the anchors
    as ``w x h`` in cells of the grid at ``img_size`` (``entries`` from :func:`summarise`)."""
    grid = f"{img_size // STRIDE}x{img_size // STRIDE}"
    lines = [f"{'k':>3} {'IoU %':>7} {'paper':>6}  anchors (w x h, cells of the {grid} grid) "
             "and the share of the boxes each is best for"]  # fmt: skip
    for entry in entries:
        paper = PAPER_CLUSTER_IOU.get(entry["k"])
        paper_cell = "-" if paper is None else f"{paper:.1f}"
        anchors = "  ".join(
            f"{w:.2f}x{h:.2f} {100 * share:.0f}%"
            for (w, h), share in zip(entry["anchors_grid"], entry["box_share"], strict=True)
        )
        lines.append(f"{entry['k']:>3} {100 * entry['mean_iou']:>7.2f} {paper_cell:>6}  {anchors}")
    return "\n".join(lines)


def write_json(document: dict, path: Path) -> None:
    """``document`` as indented JSON at ``path``, atomically; each innermost list of numbers
    (an anchor, a list of IoUs) on one line."""
    text = re.sub(
        r"\[\s*([^\[\]{}\"]*?)\s*\]",  # a list holding no list, object or string
        lambda match: "[" + " ".join(match.group(1).split()) + "]",
        json.dumps(document, indent=2),
    )
    atomic_write_text(path, text + "\n")


def write_k(wh: torch.Tensor, result: KMeansResult, k: int, out_dir: Path, img_size: int) -> dict:
    """``anchors-K.json`` and ``clusters-K.png`` for one k; returns its ``kmeans.json`` entry."""
    anchors_grid = result.anchors * (img_size // STRIDE)  # [k, 2] fractions of the image -> cells
    entry = summarise(result, anchors_grid, k, anchor_shares(wh, result.anchors)[0])
    extra = {"img_size": img_size, "mean_iou": result.mean_iou, "darknet_cfg": entry["darknet_cfg"]}
    save_anchors(anchors_grid, out_dir / entry["anchors_file"], **extra)
    figure = plot_anchor_clusters(wh, anchors_grid, img_size=img_size)
    save_figure(figure, out_dir / f"clusters-{k}.png")
    return entry


def find_anchors(config: KMeansConfig) -> dict:
    """Read the boxes, run k-means for every k of ``config.k``, write the files; returns the
    summary written to ``kmeans.json``."""
    log.info("config: %s", json.dumps(config_to_dict(config)))
    ks = parse_k(config.k)
    if config.data and not config.demo:
        root, sets, wh = Path(config.data), [], read_data_box_sizes(config)
    else:
        root, sets, classes = resolve_dataset(config)
        wh = read_voc_box_sizes(  # [M, 2]
            root, sets, classes, keep_difficult=config.keep_difficult, strict=config.strict
        )
    log.info("%d boxes from %s, sets %s", len(wh), root, ", ".join(":".join(s) for s in sets))
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with torch_threads(config.threads):
        for k in tqdm(ks, desc="k-means", unit="k", disable=len(ks) == 1):
            result = run_kmeans(
                wh, k, restarts=config.restarts, max_iter=config.max_iter, seed=config.seed
            )
            entries.append(write_k(wh, result, k, out_dir, config.img_size))
    if len(entries) > 1:
        ious = {entry["k"]: entry["mean_iou"] for entry in entries}
        save_figure(plot_iou_vs_k(ious), out_dir / "iou_vs_k.png")
    shares, default_iou = anchor_shares(wh, default_anchors() / (config.img_size // STRIDE))
    summary = {
        "num_boxes": len(wh),
        "img_size": config.img_size,
        "grid_size": config.img_size // STRIDE,
        "data_root": str(root),
        "sets": [":".join(s) for s in sets],
        "config": config_to_dict(config),
        "results": entries,
        "darknet_default": {"mean_iou": default_iou, "box_share": shares},
    }
    write_json(summary, out_dir / SUMMARY_NAME)
    log.info(
        "mean IoU of each box with its nearest anchor:\n%s",
        format_kmeans_table(entries, config.img_size),
    )
    log.info("darknet's default anchors (yolov2-voc) at --img-size %d: mean IoU %.2f%%, the share "
             "of the boxes each is best for: %s (docs/training.md#anchors compares them in "
             "training)", config.img_size, 100 * default_iou,
             " ".join(f"{100 * share:.0f}%" for share in shares))  # fmt: skip
    log.info("wrote anchors-K.json, clusters-K.png and %s into %s", SUMMARY_NAME, out_dir)
    log.info("the anchors are in cells of the %d-cell grid of --img-size %d: a run evaluated at "
             "another size says so (fit them at its size with --img-size N)",
             config.img_size // STRIDE, config.img_size)  # fmt: skip
    return summary
