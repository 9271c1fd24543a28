"""The engine of the test scripts: :func:`run_test` evaluates trained weights on a validation set
and writes metrics.json, pr_curves.png, drawn detections and VOC result files; :func:`measure_fps`
times batch-1 inference."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from utils.coco_eval import write_coco_results
from utils.fileio import atomic_write_text
from utils.metrics import to_json
from utils.records import dataset_image_ids
from utils.transforms import build_eval_transform
from utils.visualize import draw_detections, format_ap_table, plot_pr_curves, save_figure
from yolo.build import build_val_loader
from yolo.demo import resolve_demo
from yolo.evaluate import evaluate
from yolo.load import load_trained_model, require_weights
from yolo.nms import postprocess
from yolo.results import write_voc_results
from yolo.rundir import check_writable
from yolo.runtime import Runtime, setup_runtime, teardown_runtime

log = logging.getLogger(__name__)


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


def coco_category_ids(dataset) -> list[int]:
    """Label -> COCO category id: a COCO set's own ids, else label + 1 (as
    ``utils.export_dataset`` numbers a VOC or YOLO set's categories)."""
    ids = getattr(dataset, "category_ids", None)
    if ids is not None:
        missing = [c for c, cid in zip(dataset.classes, ids, strict=True) if cid < 0]
        if missing:
            log.warning("--save-coco-results: classes %s are not in the COCO file: their "
                        "detections are left out", missing[:5])  # fmt: skip
        return [int(cid) for cid in ids]
    return list(range(1, len(dataset.classes) + 1))


def coco_image_ids(dataset) -> dict:
    """Image id -> COCO's integer id: a COCO set's ids stay; a VOC or YOLO set's images are
    numbered 1..N in the set's order, as ``utils.export_dataset`` numbers them."""
    ids = dataset_image_ids(dataset)
    if all(isinstance(i, int) for i in ids):
        return {}
    return {image_id: number for number, image_id in enumerate(ids, 1)}


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
    if config.save_coco_results:
        numbered = coco_image_ids(loader.dataset)
        coco_records = [(numbered.get(r[0], r[0]), *r[1:]) for r in records]
        category_ids = coco_category_ids(loader.dataset)
        write_coco_results(coco_records, category_ids, config.save_coco_results)
    sys.stdout.write(format_ap_table(res, classes) + "\n")
    sys.stdout.write(
        f"FPS at {img_size} on {fps['device']} ({fps['precision']}), batch 1: model "
        f"{fps['fps_model']:.1f}, end to end {fps['fps_end_to_end']:.1f}\nwrote {out}/\n"
    )
    return metrics
