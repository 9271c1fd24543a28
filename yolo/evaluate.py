"""Evaluation of a model on a validation loader: :func:`evaluate` (every epoch of the trainer, and
the test scripts through :mod:`yolo.testing`), its summary line and its tensorboard logging.

:func:`write_voc_results` (defined in :mod:`yolo.results`) stays importable from here."""

from __future__ import annotations

import json
import logging
import math

import torch
from torch import nn
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from utils.metrics import DetectionEvaluator
from utils.transforms import unletterbox_detections
from utils.visualize import draw_detections, plot_pr_curves
from yolo.nms import postprocess
from yolo.results import write_voc_results
from yolo.runtime import Runtime, broadcast_flag, gather_to_main, unwrap

__all__ = ["evaluate", "log_evaluation", "summary_line", "write_voc_results"]

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
            raw.float(), anchors, conf_threshold=conf_threshold, nms_threshold=nms_threshold,
            max_detections=None,  # VOC scores every detection; the evaluator keeps COCO's 100
        )  # fmt: skip
        counts = [len(dets) for dets in detections]
        detections = torch.cat(detections).cpu().split(counts)  # one copy to the host a batch
        for image, dets, meta in zip(images, detections, metas, strict=True):
            dets = dets[:0] if meta.get("unreadable") else dets
            if len(samples) < num_vis_images:  # drawn on the network's input, in its frame
                truth = meta["gt"][:0] if letterbox else meta["gt"]
                samples.append((image.float().cpu(), dets, truth))
            if letterbox:
                height, width = meta["orig_size"]
                dets = unletterbox_detections(dets, width, height, images.shape[-1])
            local.append((meta["image_id"], tuple(meta["orig_size"]), dets, meta["gt"],
                          bool(meta.get("unreadable")), meta.get("areas"),
                          meta.get("crowd_boxes"), meta.get("crowd_labels")))  # fmt: skip
    if stop is not None and broadcast_flag(stop.requested, runtime):
        return None, []
    gathered = {rec[0]: rec for rec in gather_to_main(local, runtime)}
    if not runtime.is_main:
        return None, samples
    # by image id: score ties across images then break as pycocotools breaks them
    recs = sorted(gathered.values(), key=lambda r: r[0])
    res = score(recs, class_names)
    if records is not None:
        records.extend((r[0], r[1], r[2]) for r in recs)
    res["unreadable_images"] = sorted(r[0] for r in recs if r[4])
    if res["unreadable_images"]:
        log.warning("%d unreadable images counted with no detections: %s",
                    len(res["unreadable_images"]), res["unreadable_images"][:10])  # fmt: skip
    return res, samples


def score(recs: list, class_names: tuple[str, ...]) -> dict:
    """Every metric of ``recs`` ``(image_id, orig_size, detections, gt, unreadable, areas,
    crowd_boxes, crowd_labels)``: VOC on every detection, COCO on each image's 100 best, with
    COCO's areas and crowd regions where the dataset has them."""
    evaluator = DetectionEvaluator(len(class_names), class_names=class_names)
    areas = [r[5] for r in recs]
    evaluator.update(
        [r[2] for r in recs],
        [r[3] for r in recs],
        image_sizes=[r[1] for r in recs],
        gt_areas=None if any(a is None for a in areas) else areas,
        crowd_boxes=[r[6] for r in recs],
        crowd_labels=[r[7] for r in recs],
    )
    return evaluator.compute()


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
