"""DetectionEvaluator speed beside pycocotools, faster-coco-eval and torchmetrics.

A synthetic set the size of VOC2007 test: 4,952 images of VOC's sizes, 20 classes, about
12,000 non-difficult objects (plus difficult ones), 100 detections per image (jittered copies
of the objects, some with the wrong class, and random boxes). Every tool gets the same boxes in
pixels; difficult objects are ``iscrowd=1`` for the COCO tools (as ``DetectionEvaluator`` treats
them); all 12 COCOeval stats are compared (area ranges from the pixel boxes). Writes
bench/results/metrics_speed.{md,json}.

Run from the repository root: ``.venv/bin/python bench/metrics_speed.py``.
"""

import argparse
import contextlib
import io
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import machine_line, save_results
from utils.metrics import DetectionEvaluator


def _image_objects(rng, num_classes: int, class_weights: np.ndarray) -> np.ndarray:
    """``[G, 6]`` (x1, y1, x2, y2, class, difficult): 1 + Poisson(2) objects, 20% difficult."""
    num_gt = 1 + rng.poisson(2.0)
    centre = rng.uniform(0.1, 0.9, (num_gt, 2))
    size = rng.uniform(0.05, 0.6, (num_gt, 2))
    boxes = np.clip(np.concatenate([centre - size / 2, centre + size / 2], 1), 0, 1)
    labels = rng.choice(num_classes, num_gt, p=class_weights)
    return np.column_stack([boxes, labels, rng.random(num_gt) < 0.2])


def _image_detections(rng, objects: np.ndarray, num_classes: int, count: int) -> np.ndarray:
    """``[count, 6]`` detections, best first: 1 + Poisson(4) jittered copies per object (10% with
    a wrong class, scores ~ Beta(4, 2)), then random boxes of any class (scores ~ Beta(1, 6))."""
    copies = np.minimum(1 + rng.poisson(4, len(objects)), count // len(objects))
    size = objects[:, 2:4] - objects[:, :2]  # [G, 2]
    noise = rng.normal(0, 0.08, (copies.sum(), 4)) * np.repeat(np.tile(size, 2), copies, 0)
    near = np.clip(np.repeat(objects[:, :4], copies, 0) + noise, 0, 1)  # [n, 4]
    labels = np.repeat(objects[:, 4], copies)
    wrong = rng.random(len(labels)) < 0.1
    labels[wrong] = rng.integers(0, num_classes, wrong.sum())
    num_random = count - len(near)
    corner = rng.uniform(0, 0.8, (num_random, 2))
    far = np.clip(
        np.concatenate([corner, corner + rng.uniform(0.02, 0.5, (num_random, 2))], 1), 0, 1
    )
    boxes = np.concatenate([near, far])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])  # jitter never turns a box inside out
    scores = np.concatenate([rng.beta(4, 2, len(near)), rng.beta(1, 6, num_random)])
    labels = np.concatenate([labels, rng.integers(0, num_classes, num_random)])
    rows = np.column_stack([boxes, scores, labels])
    return rows[np.argsort(-scores, kind="stable")]


VOC_SIZES = ((375, 500), (500, 375), (333, 500), (500, 333), (281, 500), (500, 500))


def make_set(seed: int, num_images: int, num_classes: int, dets_per_image: int):
    """Lists over images of float32 tensors: detections ``[100, 6]``, ground truths ``[G, 6]``,
    and (height, width) sizes."""
    rng = np.random.default_rng(seed)
    class_weights = rng.dirichlet(np.full(num_classes, 1.0))
    detections, ground_truths = [], []
    sizes = [VOC_SIZES[i] for i in rng.integers(0, len(VOC_SIZES), num_images)]
    for _ in range(num_images):
        objects = _image_objects(rng, num_classes, class_weights)
        rows = _image_detections(rng, objects, num_classes, dets_per_image)
        ground_truths.append(torch.from_numpy(objects.astype(np.float32)))
        detections.append(torch.from_numpy(rows.astype(np.float32)))
    return detections, ground_truths, sizes


def run_ours(detections, ground_truths, sizes, num_classes: int, batch_size: int = 32):
    """(result, update seconds, compute seconds), fed in batches as an evaluation loop does."""
    start = time.perf_counter()
    evaluator = DetectionEvaluator(num_classes)
    for lo in range(0, len(detections), batch_size):
        batch = slice(lo, lo + batch_size)
        evaluator.update(detections[batch], ground_truths[batch], image_sizes=sizes[batch])
    middle = time.perf_counter()
    res = evaluator.compute()
    return res, middle - start, time.perf_counter() - middle


def _pixel_xywh(x1, y1, x2, y2, size) -> list[float]:
    """Normalised xyxy -> pixel xywh as ``write_coco_results`` writes it."""
    height, width = size
    return [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height]


def many_detections(num_images: int, num_classes: int) -> dict:
    """Update + compute on every detection an untrained head leaves after NMS (416 x 416, conf
    0.005, no cap): seconds (best of 2) and the peak traced allocation of a third run."""
    from utils.anchors import default_anchors
    from yolo.nms import postprocess

    gen = torch.Generator().manual_seed(3)
    channels = len(default_anchors()) * (5 + num_classes)
    detections = []
    for lo in range(0, num_images, 16):
        raw = torch.randn(min(16, num_images - lo), channels, 13, 13, generator=gen)
        detections += postprocess(raw, default_anchors(), max_detections=None)
    _, ground_truths, sizes = make_set(1, num_images, num_classes, 100)
    runs = [run_ours(detections, ground_truths, sizes, num_classes, 16) for _ in range(2)]
    tracemalloc.start()
    run_ours(detections, ground_truths, sizes, num_classes, 16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "images": num_images,
        "detections_per_image": sum(len(d) for d in detections) / num_images,
        "update_s": min(r[1] for r in runs),
        "compute_s": min(r[2] for r in runs),
        "peak_mib": peak / 2**20,
    }


def coco_dataset(ground_truths, sizes, num_classes: int) -> dict:
    """COCO-format ground truth (pixel xywh, difficult as iscrowd), image ids 1..N in order."""
    annotations = []
    for image, rows in enumerate(ground_truths):
        for x1, y1, x2, y2, label, difficult in rows.double().tolist():
            bbox = _pixel_xywh(x1, y1, x2, y2, sizes[image])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image + 1,
                    "category_id": int(label) + 1,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": int(difficult),
                }
            )
    return {
        "images": [{"id": i + 1} for i in range(len(ground_truths))],
        "annotations": annotations,
        "categories": [{"id": c + 1} for c in range(num_classes)],
    }


def coco_results(detections, sizes) -> list[dict]:
    """COCO-format detection results (a fresh list: loadRes writes into it)."""
    return [
        {
            "image_id": i + 1,
            "category_id": int(c) + 1,
            "bbox": _pixel_xywh(x1, y1, x2, y2, sizes[i]),
            "score": s,
        }
        for i, rows in enumerate(detections)
        for x1, y1, x2, y2, s, c in rows.double().tolist()
    ]


def run_cocoapi(coco_cls, eval_cls, dataset: dict, results: list[dict], *, area_all_only: bool):
    """(stats, seconds for loadRes + evaluate + accumulate) with a pycocotools-style API."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        start = time.perf_counter()
        coco_eval = eval_cls(coco_gt, coco_gt.loadRes(results), "bbox")
        if area_all_only:
            coco_eval.params.areaRng = [[0.0, 1e10]]
            coco_eval.params.areaRngLbl = ["all"]
        coco_eval.evaluate()
        coco_eval.accumulate()
        seconds = time.perf_counter() - start
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats[: 3 if area_all_only else 12]], seconds


def run_torchmetrics(detections, ground_truths, backend: str, batch_size: int = 32):
    """(map, map_50, map_75), seconds for update + compute of MeanAveragePrecision."""
    from torchmetrics.detection import MeanAveragePrecision

    start = time.perf_counter()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend)
    for lo in range(0, len(detections), batch_size):
        preds = [
            {"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()}
            for d in detections[lo : lo + batch_size]
        ]
        target = [
            {"boxes": g[:, :4], "labels": g[:, 4].long(), "iscrowd": g[:, 5].long()}
            for g in ground_truths[lo : lo + batch_size]
        ]
        metric.update(preds, target)
    out = metric.compute()
    seconds = time.perf_counter() - start
    return [float(out[k]) for k in ("map", "map_50", "map_75")], seconds


def comparison_rows(detections, ground_truths, sizes, num_classes: int) -> list[dict]:
    """Time every other tool that is installed; a missing one gets a row that says so."""
    rows = []
    dataset = coco_dataset(ground_truths, sizes, num_classes)
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        for area_all in (False, True):
            stats, seconds = run_cocoapi(
                COCO, COCOeval, dataset, coco_results(detections, sizes), area_all_only=area_all
            )
            what = "loadRes+evaluate+accumulate" + (", area all only" if area_all else "")
            rows.append({"tool": "pycocotools", "timed": what, "seconds": seconds, "coco": stats})
    except ImportError as error:
        rows.append({"tool": "pycocotools", "timed": f"not installed ({error})"})
    try:
        from faster_coco_eval import COCO as FastCOCO
        from faster_coco_eval import COCOeval_faster

        stats, seconds = run_cocoapi(
            FastCOCO, COCOeval_faster, dataset, coco_results(detections, sizes), area_all_only=False
        )
        what = "loadRes+evaluate+accumulate"
        rows.append({"tool": "faster-coco-eval", "timed": what, "seconds": seconds, "coco": stats})
    except ImportError as error:
        rows.append({"tool": "faster-coco-eval", "timed": f"not installed ({error})"})
    for backend in ("faster_coco_eval", "pycocotools"):
        try:
            stats, seconds = run_torchmetrics(detections, ground_truths, backend)
        except (ImportError, ModuleNotFoundError) as error:
            rows.append({"tool": "torchmetrics", "timed": f"not runnable ({error})"})
            continue
        what = f"MeanAveragePrecision update+compute, backend {backend}"
        rows.append({"tool": "torchmetrics", "timed": what, "seconds": seconds, "coco": stats})
    return rows


def markdown(rows: list[dict], ours_total: float, res: dict, header: str) -> str:
    lines = [
        "| tool | timed | seconds | x ours | mAP@.5:.95 | AP50 | AP75 | APs | AR100 | "
        "max abs diff vs ours (stats compared) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours = res["coco_stats"]
    for row in rows:
        if "seconds" not in row:
            lines.append(f"| {row['tool']} | {row['timed']} | - | - | - | - | - | - | - | - |")
            continue
        stats = row["coco"]
        diff = max(abs(a - b) for a, b in zip(stats, ours[: len(stats)], strict=True))
        extra = [f"{stats[i]:.6f}" if len(stats) > i else "-" for i in (3, 8)]
        lines.append(
            f"| {row['tool']} | {row['timed']} | {row['seconds']:.2f} | "
            f"{row['seconds'] / ours_total:.1f} | {stats[0]:.6f} | {stats[1]:.6f} | "
            f"{stats[2]:.6f} | {extra[0]} | {extra[1]} | {diff:.1e} ({len(stats)}) |"
        )
    return "\n".join([header, "", *lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4952)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-others", action="store_true", help="time DetectionEvaluator only")
    args = parser.parse_args()
    detections, ground_truths, sizes = make_set(0, args.images, args.classes, 100)
    runs = [run_ours(detections, ground_truths, sizes, args.classes) for _ in range(args.repeats)]
    res = runs[0][0]
    update_s = statistics.median(r[1] for r in runs)
    compute_s = statistics.median(r[2] for r in runs)
    total = statistics.median(r[1] + r[2] for r in runs)
    num_difficult = sum(int(g[:, 5].sum()) for g in ground_truths)
    header = (
        f"{args.images} images, {args.classes} classes, {res['num_ground_truths']} objects "
        f"(+{num_difficult} difficult), {res['num_detections']} detections. "
        f"DetectionEvaluator (median of {args.repeats}): update {update_s:.3f} s + compute "
        f"{compute_s:.3f} s = {total:.3f} s; VOC07 mAP {res['map_voc07']:.6f}, "
        f"VOC12 mAP {res['map_voc12']:.6f}."
    )
    ours_row = {
        "tool": "DetectionEvaluator",
        "timed": "update (batches of 32) + compute, all VOC and COCO metrics",
        "seconds": total,
        "coco": res["coco_stats"],
    }
    rows = [ours_row] + (
        [] if args.skip_others else comparison_rows(detections, ground_truths, sizes, args.classes)
    )
    many = many_detections(100, args.classes)
    header += f" {machine_line()}."  # after every timing, so the load average covers them
    text = markdown(rows, total, res, header) + (
        f"\nEvery detection of an untrained head after NMS (416, conf 0.005, no cap): "
        f"{many['images']} images x {many['detections_per_image']:.0f} detections, update "
        f"{many['update_s']:.2f} s + compute {many['compute_s']:.2f} s (best of 2), peak traced "
        f"allocation {many['peak_mib']:.0f} MiB.\n"
    )
    print(text)
    summary = {
        "header": header, "update_s": update_s, "compute_s": compute_s, "rows": rows,
        "untrained_head_all_detections": many,
    }  # fmt: skip
    save_results("metrics_speed", text, summary)


if __name__ == "__main__":
    main()
