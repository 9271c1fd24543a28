"""Detections from the raw head for a whole batch in one pass, in darknet's order.

As darknet's ``get_region_detections`` + ``do_nms_sort`` (``src/region_layer.c``,
``src/box.c``): every (box, class) pair whose score ``objectness * class_prob`` exceeds
``conf_threshold`` is a candidate; NMS runs per image and class on the *unclipped* boxes, a box
being suppressed by a higher-scored kept box of its image and class with IoU ``> nms_threshold``;
then the boxes are clipped to [0, 1] and each image keeps its ``max_detections`` highest scores
(all of them for ``max_detections=None``, as darknet's validate_detector and the VOC devkit
score them). Equal scores keep the candidate order (image, row, col, anchor, class).

With a cap, NMS first covers each image's ``2 * max_detections`` best candidates; a second pass
covers all candidates of the images where that kept fewer than ``max_detections`` (an untrained
head passes 14k candidates an image, a trained one a few hundred). Both are exact: greedy NMS
decides a box from the higher-scored boxes of its group alone, and the boxes below an image's
best cannot enter its top ``max_detections`` once those hold enough kept ones. A class
probability is at most 1, so only predictions whose objectness passes the threshold are decoded.

NMS itself: on the CPU one ``torchvision.ops.nms`` per (image, class) group over a contiguous
slice of the candidates sorted by group (IoU work grows with the square of a group, so groups
are never merged); on CUDA one call for many images at once, groups kept apart by offsetting
their boxes (no host sync per image; torchvision's CUDA NMS keeps an n² / 8 byte mask, so the
images are taken ``_CUDA_NMS_CANDIDATES`` candidates at a time).
"""

import itertools

import torch
from torchvision.ops import nms

from yolo.converter import cell_boxes, flatten_predictions

__all__ = ["postprocess"]

_CUDA_NMS_CANDIDATES = 32768  # a 128 MiB suppression mask per call
_CPU_MERGE_BUDGET = 10_000  # IoU pairs worth one more CPU nms call (measured, order of magnitude)


def postprocess(
    raw: torch.Tensor,
    anchors: torch.Tensor,
    conf_threshold: float = 0.005,
    nms_threshold: float = 0.45,
    max_detections: int | None = 100,
) -> list[torch.Tensor]:
    """Raw head ``[N, A*(5+C), H, W]`` and ``anchors`` ``[A, 2]`` (grid cells) -> N detection
    tensors ``[K, 6]`` = (x1, y1, x2, y2, score, class), normalised xyxy clipped to [0, 1],
    sorted by score, highest first, ``K <= max_detections`` (no cap for None); float32
    (float64 for a float64 input)."""
    _check_arguments(raw, anchors, conf_threshold, nms_threshold, max_detections)
    batch_size = raw.shape[0]
    dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    with torch.no_grad(), torch.autocast(raw.device.type, enabled=False):
        boxes, scores, image, label = _candidates(raw.to(dtype), anchors, conf_threshold)
        num_classes = raw.shape[1] // anchors.shape[0] - 5
        kept = _nms_best_first(
            boxes, scores, image, image * num_classes + label, nms_threshold,
            batch_size=batch_size, max_detections=max_detections,
        )  # fmt: skip
        one_key = _one_key(scores, conf_threshold, batch_size)
        kept = kept[_group_then_score(image[kept], scores[kept], one_key)]  # [K'] by image, score
        if max_detections is not None:
            rank = _rank_in_run(torch.bincount(image[kept], minlength=batch_size))  # [K']
            kept = kept[rank < max_detections]
        columns = (boxes[kept].clamp(0.0, 1.0), scores[kept, None], label[kept, None].to(dtype))
        counts = torch.bincount(image[kept], minlength=batch_size)
        return list(torch.cat(columns, dim=1).split(counts.tolist()))  # N x [K, 6]


def _candidates(
    raw: torch.Tensor, anchors: torch.Tensor, conf_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (box, class) pair above the threshold: boxes ``[K, 4]`` unclipped xyxy, scores
    ``[K]``, image ``[K]`` and class ``[K]`` int64, ordered by (image, row, col, anchor,
    class)."""
    _, _, grid_h, grid_w = raw.shape
    num_anchors = anchors.shape[0]
    flat = flatten_predictions(raw, num_anchors)  # [N, P, 5+C]
    objectness = flat[..., 4].sigmoid()  # [N, P]
    image, pred = (objectness > conf_threshold).nonzero(as_tuple=True)  # [M], [M]
    selected = flat[image, pred]  # [M, 5+C]
    cell, anchor = pred // num_anchors, pred % num_anchors  # [M], [M]
    anchor_wh = anchors.to(raw.device, raw.dtype)[anchor]  # [M, 2]
    boxes = cell_boxes(selected[:, :4], cell % grid_w, cell // grid_w, anchor_wh, grid_h, grid_w)
    scores = objectness[image, pred, None] * selected[:, 5:].softmax(dim=1)  # [M, C]
    pair, label = (scores > conf_threshold).nonzero(as_tuple=True)  # [K], [K]
    return boxes[pair], scores[pair, label], image[pair], label


def _nms_best_first(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image: torch.Tensor,
    groups: torch.Tensor,
    iou_threshold: float,
    *,
    batch_size: int,
    max_detections: int | None,
) -> torch.Tensor:
    """Kept candidates (ascending indices ``[K']``) of candidates ordered by image: NMS over
    each image's ``2 * max_detections`` best first (ties at the last score included), then over
    all candidates of the images where that kept fewer than ``max_detections``; NMS over all
    candidates at once without a cap."""
    everything = torch.ones_like(image, dtype=torch.bool)  # [K]
    if max_detections is None:
        return _nms(everything, boxes, scores, groups, image, iou_threshold)
    count = torch.bincount(image, minlength=batch_size)  # [N]
    best = everything
    if image.numel() and int(count.max()) > 2 * max_detections:
        padded = scores.new_full((batch_size, int(count.max())), -1.0)  # [N, most]
        padded[image, _rank_in_run(count)] = scores
        floor = padded.topk(2 * max_detections, dim=1).values[:, -1]  # [N], -1 if fewer
        best = scores >= floor[image]  # [K] a prefix of each image's candidates by score
    kept = _nms(best, boxes, scores, groups, image, iou_threshold)
    redo = (torch.bincount(image[kept], minlength=batch_size) < max_detections)[image]  # [K]
    if not bool((redo & ~best).any()):
        return kept
    redone = _nms(redo, boxes, scores, groups, image, iou_threshold)
    return torch.cat([kept[~redo[kept]], redone]).sort().values


def _nms(
    subset: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    image: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """Greedy NMS per group of the candidates where ``subset`` ``[K]`` (bool) holds: boxes
    ``[K, 4]`` unclipped xyxy, scores ``[K]``, groups ``[K]`` (image * C + class), image ``[K]``
    non-decreasing -> ascending indices of the kept ones. IoU in float64, as darknet's double
    ``box_iou``, whatever the boxes' dtype."""
    index = subset.nonzero().squeeze(1)  # [S]
    if index.numel() == 0:
        return index
    if boxes.is_cuda:
        chosen = (boxes[index].double(), scores[index].double(), groups[index], image[index])
        return index[_nms_offset(*chosen, iou_threshold)].sort().values
    chosen_scores = scores[index]
    one_key = _one_key(chosen_scores, float(chosen_scores.min()), int(groups[index].max()) + 1)
    order = index[_group_then_score(groups[index], chosen_scores, one_key)]  # [S] group, score
    sizes = torch.unique_consecutive(groups[order], return_counts=True)[1]  # [G]
    first_group = _segments(sizes.tolist())  # [segments + 1] group bounds
    group = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # [S] 0..G-1
    segment = torch.bucketize(group, torch.tensor(first_group[1:]), right=True)  # [S]
    local = group - torch.tensor(first_group)[segment]  # [S] group index within the segment
    chosen = boxes[order].double()
    chosen = chosen - chosen.min()
    chosen = chosen + (local * (chosen.max() + 1))[:, None]  # groups of a segment apart
    chosen_scores = scores[order].double()
    bounds = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])[first_group].tolist()
    kept = [
        nms(chosen[lo:hi], chosen_scores[lo:hi], iou_threshold) + lo
        for lo, hi in itertools.pairwise(bounds)
    ]
    return order[torch.cat(kept)].sort().values


def _segments(sizes: list[int], budget: int = _CPU_MERGE_BUDGET) -> list[int]:
    """Consecutive groups of ``sizes`` candidates -> bounds (group indices) of the runs that
    share one CPU ``nms`` call: a group joins the run while (run size) x (group size), the IoU
    work the merge adds, stays under ``budget`` (about the cost of a call)."""
    bounds, run = [0], 0
    for i, size in enumerate(sizes):
        if run and run * size >= budget:
            bounds.append(i)
            run = 0
        run += size
    return [*bounds, len(sizes)]


def _nms_offset(boxes, scores, groups, image, iou_threshold) -> torch.Tensor:
    """CUDA: ``nms`` over groups moved apart (each by ``group * (extent + 1)`` after moving
    the boxes to non-negative coordinates, exact in float64), at most
    ``_CUDA_NMS_CANDIDATES`` candidates a call unless one image alone holds more; one host sync
    for the split. Returns indices into the given ``[S]`` candidates."""
    boxes = boxes - boxes.min()
    boxes = boxes + (groups * (boxes.max() + 1)).to(boxes.dtype)[:, None]
    count = torch.bincount(image - image[0])  # [images in the subset's span]
    bounds, start, total = [0], 0, 0
    for size in count.tolist():  # the one host sync: where to split the candidates
        if total + size > _CUDA_NMS_CANDIDATES and total > 0:
            bounds.append(start)
            total = 0
        start, total = start + size, total + size
    bounds.append(start)
    kept = [
        nms(boxes[lo:hi], scores[lo:hi], iou_threshold) + lo
        for lo, hi in itertools.pairwise(bounds)
        if hi > lo
    ]
    return torch.cat(kept)


def _group_then_score(group: torch.Tensor, score: torch.Tensor, one_key: bool) -> torch.Tensor:
    """Stable order ``[K]`` by ``group`` ``[K]`` (int, >= 0), then by descending ``score``
    ``[K]`` (at most 1), ties in the given order. ``one_key`` (the caller knows the scores are
    float32 above 2^-10, so ulp >= 2^-33, and the groups below 2^18): one sort of
    ``4 group + 1 - score`` in float64, exact as 2 + 18 + 33 bits <= 53; else two sorts."""
    if one_key:
        return (group.double() * 4 + (1 - score.double())).argsort(stable=True)
    order = score.argsort(descending=True, stable=True)
    return order[group[order].argsort(stable=True)]


def _one_key(score: torch.Tensor, score_floor: float, num_groups: int) -> bool:
    """Whether ``_group_then_score`` may use its single float64 key."""
    return score.dtype == torch.float32 and score_floor >= 2**-10 and num_groups <= 2**18


def _rank_in_run(count: torch.Tensor) -> torch.Tensor:
    """Runs of ``count`` ``[N]`` elements laid end to end -> each element's position within
    its run, ``[sum(count)]`` int64."""
    start = (torch.cumsum(count, 0) - count).repeat_interleave(count)  # [sum(count)]
    return torch.arange(start.numel(), device=count.device) - start


def _check_arguments(
    raw: torch.Tensor,
    anchors: torch.Tensor,
    conf_threshold: float,
    nms_threshold: float,
    max_detections: int | None,
) -> None:
    num_anchors = anchors.shape[0] if anchors.ndim == 2 and anchors.shape[1] == 2 else 0
    if (
        num_anchors == 0
        or raw.ndim != 4
        or raw.shape[1] % num_anchors
        or raw.shape[1] // num_anchors < 6
    ):
        raise ValueError(
            f"raw output of shape {tuple(raw.shape)} and anchors of shape "
            f"{tuple(anchors.shape)}: expected [N, A*(5+C), H, W] and [A, 2]"
        )
    if not 0.0 <= conf_threshold < 1.0:
        raise ValueError(f"conf_threshold={conf_threshold}: must be in [0, 1)")
    if not 0.0 <= nms_threshold <= 1.0:
        raise ValueError(f"nms_threshold={nms_threshold}: must be in [0, 1]")
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"max_detections={max_detections}: must be at least 1, or None")
