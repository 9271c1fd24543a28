"""Evaluation: :func:`evaluate` (used every epoch by the trainer) and :func:`run_test`, the engine
of the test scripts (metrics, plots, drawn detections, FPS, VOC result files)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from utils.fileio import atomic_write_text
from utils.metrics import DetectionEvaluator, to_json
from utils.transforms import build_eval_transform, unletterbox_detections
from utils.visualize import draw_detections, format_ap_table, plot_pr_curves, save_figure
from utils.voc import boxes_to_voc_pixels
from yolo.build import build_val_loader, load_trained_model, require_weights, resolve_demo
from yolo.nms import postprocess
from yolo.rundir import check_writable
from yolo.runtime import (
    Runtime,
    broadcast_flag,
    gather_to_main,
    setup_runtime,
    teardown_runtime,
    unwrap,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    anchors: torch.Tensor,
    *,
    runtime: Runtime,
    class_names: tuple[str, ...],
    conf_threshold: float = 0.005,
    nms_threshold: float = 0.45,
    num_vis_images: int = 0,
    records: list | None = None,
    stop=None,
    letterbox: bool = False,
) -> tuple[dict | None, list]:
    """Detections on a validation loader scored by :class:`DetectionEvaluator`.

    Each rank evaluates its shard; detections are gathered (and de-duplicated by image id, since
    a sharded sampler may repeat images to even out the ranks) so that the main rank scores the
    whole set; other ranks get ``None``. An image the dataset could not read counts with no
    detections, so its objects are misses (``res["unreadable_images"]`` lists them). Returns
    ``(metrics, samples)`` with up to ``num_vis_images`` samples ``(image [3,H,W], detections
    [K,6], ground truth [G,6])``; ``(None, [])`` when ``stop`` was requested meanwhile.
    ``records``, when given, receives ``(image_id, orig_size, detections)`` for every image.
    ``letterbox``: the loader letterboxes (darknet's ``letterbox_image``), so the boxes are
    mapped back to each original image.
    """
    model = unwrap(model).eval()
    anchors = anchors.to(runtime.device)
    local, samples = [], []
    for images, _, metas in tqdm(loader, desc="eval", disable=not runtime.is_main, leave=False):
        if stop is not None and stop.requested:
            break
        images = runtime.to_device(images)
        with runtime.autocast():
            raw = model(images)
        detections = postprocess(
            raw.float(), anchors, conf_threshold=conf_threshold, nms_threshold=nms_threshold
        )
        for image, dets, meta in zip(images, detections, metas, strict=True):
            dets = dets.cpu()[:0] if meta.get("unreadable") else dets.cpu()
            if len(samples) < num_vis_images:  # drawn on the network's input, in its frame
                truth = meta["gt"][:0] if letterbox else meta["gt"]
                samples.append((image.float().cpu(), dets, truth))
            if letterbox:
                height, width = meta["orig_size"]
                dets = unletterbox_detections(dets, width, height, images.shape[-1])
            local.append((meta["image_id"], tuple(meta["orig_size"]), dets, meta["gt"],
                          bool(meta.get("unreadable"))))  # fmt: skip
    if stop is not None and broadcast_flag(stop.requested, runtime):
        return None, []
    gathered = {rec[0]: rec for rec in gather_to_main(local, runtime)}
    if not runtime.is_main:
        return None, samples
    evaluator = DetectionEvaluator(len(class_names), class_names=class_names)
    evaluator.update([r[2] for r in gathered.values()], [r[3] for r in gathered.values()])
    if records is not None:
        records.extend((r[0], r[1], r[2]) for r in gathered.values())
    res = evaluator.compute()
    res["unreadable_images"] = sorted(r[0] for r in gathered.values() if r[4])
    if res["unreadable_images"]:
        log.warning("%d unreadable images counted with no detections: %s",
                    len(res["unreadable_images"]), res["unreadable_images"][:10])  # fmt: skip
    return res, samples


def summary_line(res: dict) -> str:
    """The five headline numbers as one JSON line."""
    keys = ("map_voc07", "map_voc12", "map_coco", "ap50_coco", "ap75_coco")
    return json.dumps({k: round(res[k], 4) for k in keys})


def log_evaluation(writer, res: dict, samples: list, classes, step: int) -> None:
    """Metrics, per-class AP, PR curves and drawn detections to tensorboard."""
    for key in ("map_voc07", "map_voc12", "map_coco", "ap50_coco", "ap75_coco"):
        writer.add_scalar(f"val/{key}", res[key], step)
    for name, ap in zip(classes, res["per_class"]["voc07"], strict=True):
        if math.isfinite(ap):
            writer.add_scalar(f"val/ap/{name}", ap, step)
    writer.add_figure("val/pr_curves", plot_pr_curves(res, classes), step)
    for i, (image, dets, gt) in enumerate(samples):
        drawn = draw_detections(image, dets, classes, ground_truths=gt)
        writer.add_image(f"val/detections/{i}", pil_to_tensor(drawn), step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_fps(
    model: nn.Module,
    anchors: torch.Tensor,
    *,
    img_size: int,
    runtime: Runtime,
    iters: int = 50,
    warmup: int = 5,
) -> dict:
    """Batch-1 frames per second: the model alone (the FPS papers report) and end to end with
    postprocess; synchronised on CUDA so the clock measures the GPU's work."""
    device = runtime.device
    image = runtime.to_device(torch.rand(1, 3, img_size, img_size))
    anchors = anchors.to(device)
    results = {}
    for name, with_post in (("fps_model", False), ("fps_end_to_end", True)):
        for i in range(warmup + iters):
            if i == warmup:
                _sync(device)
                start = time.perf_counter()
            with runtime.autocast():
                raw = model(image)
            if with_post:
                postprocess(raw.float(), anchors)
        _sync(device)
        results[name] = iters / (time.perf_counter() - start)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {**results, "device": name, "precision": runtime.precision, "img_size": img_size}


def write_voc_results(records: list, classes: tuple[str, ...], out_dir: str | Path) -> None:
    """VOC result files ``comp4_det_test_<class>.txt``: ``image_id score x1 y1 x2 y2``.

    ``records``: ``(image_id, (height, width), detections [K, 6])`` with normalised xyxy boxes.
    Boxes are written in the VOC pixel frame of the original image, ``(x1 W + 1, y1 H + 1,
    x2 W, y2 H)`` to 0.01 pixel (the inverse of the loader's mapping, so the devkit's +1 IoU
    is ours); scores in the shortest form that reads back to the same value, so that the
    devkit's stable sort sees the order and the ties the evaluator saw. Lines keep the order
    of ``records``, then of rows.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {c: [] for c in range(len(classes))}
    for image_id, (height, width), dets in records:
        dets = torch.as_tensor(dets).detach().cpu()
        dtype = torch.float64 if dets.dtype == torch.float64 else torch.float32
        corners = boxes_to_voc_pixels(dets[:, :4].double(), width, height).tolist()  # [K, 4]
        scores = dets[:, 4].to(dtype).numpy()
        for (x1, y1, x2, y2), score, label in zip(
            corners, scores, dets[:, 5].tolist(), strict=True
        ):
            text = np.format_float_positional(score, trim="-")
            lines[int(label)].append(f"{image_id} {text} {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}")
    for label, name in enumerate(classes):
        atomic_write_text(
            out_dir / f"comp4_det_test_{name}.txt", "".join(f"{x}\n" for x in lines[label])
        )


def run_test(config) -> dict:
    """Evaluate ``config.weights`` on ``config.val_set``; write metrics, plots and samples."""
    require_weights(config)
    check_writable(Path(config.out), "--out")
    runtime = setup_runtime(config.device, config.amp)
    try:
        return _run_test(resolve_demo(config, runtime), runtime)
    finally:
        teardown_runtime(runtime)


def _run_test(config, runtime: Runtime) -> dict:
    trained = load_trained_model(
        config.weights,
        model_name=config.model,
        classes_file=config.classes,
        anchors_file=config.anchors,
    )
    classes, anchors = trained.classes, trained.anchors
    img_size = config.img_size or trained.img_size
    model = trained.model.to(runtime.device)
    if runtime.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    transform = build_eval_transform(img_size, letterbox=config.letterbox)
    loader = build_val_loader(config, classes, transform, workers=config.workers, runtime=runtime)
    records: list = []
    res, samples = evaluate(
        model,
        loader,
        anchors,
        runtime=runtime,
        class_names=classes,
        conf_threshold=config.conf_threshold,
        nms_threshold=config.nms_threshold,
        num_vis_images=config.num_vis_images,
        records=records,
        letterbox=config.letterbox,
    )
    if not runtime.is_main:  # under torchrun, rank 0 scores the gathered detections
        return {}
    out = Path(config.out)
    fps = measure_fps(model, anchors, img_size=img_size, runtime=runtime, iters=config.fps_iters)
    metrics = {**to_json(res), **fps, "weights": str(config.weights)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    save_figure(plot_pr_curves(res, classes), out / "pr_curves.png")
    (out / "detections").mkdir(parents=True, exist_ok=True)
    for i, (image, dets, gt) in enumerate(samples):
        draw_detections(image, dets, classes, ground_truths=gt).save(
            out / "detections" / f"{i:03d}.jpg", quality=90
        )
    if config.save_voc_results:
        write_voc_results(records, classes, config.save_voc_results)
    sys.stdout.write(format_ap_table(res, classes) + "\n")
    sys.stdout.write(
        f"FPS at {img_size} on {fps['device']} ({fps['precision']}), batch 1: model "
        f"{fps['fps_model']:.1f}, end to end {fps['fps_end_to_end']:.1f}\nwrote {out}/\n"
    )
    return metrics
