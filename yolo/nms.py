"""Detections from the raw head for a whole batch in one pass: threshold, per-class NMS, top-k.

Every (box, class) pair whose score ``objectness * class_prob`` exceeds ``conf_threshold`` is
a candidate; boxes are clipped to [0, 1]; NMS runs per image and class, a box being suppressed
by a higher-scored kept box of its image and class with IoU ``> nms_threshold``, exactly as
``torchvision.ops.batched_nms`` with the group ``image * C + class``; each image keeps its
``max_detections`` highest scores.

Since a class probability is at most 1, only predictions whose objectness exceeds the
threshold are decoded at all. The NMS is greedy NMS computed for all groups at once:
candidates sorted by (group, score), the IoU of every pair within a group, then the greedy
keep set as the fixed point of "kept unless a kept, higher-scored box of the group overlaps
it", reached in as many rounds as the longest suppression chain. ``torchvision.ops.nms`` walks
every later box for every kept one, so one call on offset boxes costs O(K^2) for K candidates,
and ``batched_nms`` above 1000 boxes on CPU loops over the groups in Python; both are slow for
a batch's few hundred small groups. Above ``MAX_NMS_PAIRS`` same-group pairs (an untrained
model, where almost everything passes the threshold) it hands over to ``batched_nms`` to bound
memory. Equal scores keep the order (image, row, col, anchor, class). Since only each image's
``max_detections`` best kept boxes are returned, NMS runs first over each image's best
``PRUNE_FACTOR * max_detections`` candidates, and over all of them only for an image where
that kept too few (exact either way: see :func:`_nms_best_first`).
"""

import torch
from torchvision.ops import batched_nms

from yolo.converter import cell_boxes

__all__ = ["MAX_NMS_PAIRS", "PRUNE_FACTOR", "grouped_nms", "postprocess"]

MAX_NMS_PAIRS = 1 << 20
PRUNE_FACTOR = 2  # NMS first over each image's 2 * max_detections best candidates


def postprocess(
    raw: torch.Tensor,
    anchors: torch.Tensor,
    conf_threshold: float = 0.005,
    nms_threshold: float = 0.45,
    max_detections: int = 100,
) -> list[torch.Tensor]:
    """Raw head ``[N, A*(5+C), H, W]`` and ``anchors`` ``[A, 2]`` -> N detection tensors
    ``[K, 6]`` = (x1, y1, x2, y2, score, class), normalised xyxy clipped to [0, 1], sorted by
    score, highest first, ``K <= max_detections``; float32 (float64 for a float64 input)."""
    _check_arguments(raw, anchors, conf_threshold, nms_threshold, max_detections)
    batch_size = raw.shape[0]
    dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    with torch.no_grad(), torch.autocast(raw.device.type, enabled=False):
        boxes, scores, image, label = _candidates(raw.to(dtype), anchors, conf_threshold)
        num_classes = raw.shape[1] // anchors.shape[0] - 5
        groups = image * num_classes + label  # [K]
        kept = _nms_best_first(
            boxes, scores, image, groups, nms_threshold,
            batch_size=batch_size, max_detections=max_detections,
        )  # fmt: skip
        kept = _top_per_image(kept, scores, image, batch_size, max_detections)
        columns = (boxes, scores[:, None], label[:, None].to(dtype))
        detections = torch.cat([c.index_select(0, kept) for c in columns], dim=1)  # [sum K, 6]
        counts = torch.bincount(image.index_select(0, kept), minlength=batch_size)
        return list(detections.split(counts.tolist()))


def _candidates(
    raw: torch.Tensor, anchors: torch.Tensor, conf_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (box, class) pair above the threshold: boxes ``[K, 4]`` clipped xyxy, scores
    ``[K]``, image ``[K]`` and class ``[K]`` int64, ordered by (image, row, col, anchor,
    class). Gathers are 1-D ``index_select`` calls: on the CPU they cost a fraction of
    multi-dimensional advanced indexing."""
    batch_size, channels, grid_h, grid_w = raw.shape
    num_anchors, cells = anchors.shape[0], grid_h * grid_w
    width = channels // num_anchors  # 5 + C
    head = raw.reshape(batch_size, num_anchors, width, cells)  # [N, A, 5+C, H*W]
    objectness = head[:, :, 4].sigmoid().transpose(1, 2).reshape(-1)  # [N*H*W*A]
    index = (objectness > conf_threshold).nonzero().squeeze(1)  # [M] (image, cell, anchor)
    image, cell = index // (cells * num_anchors), index // num_anchors % cells  # [M] each
    anchor = index % num_anchors  # [M]
    channel_0 = (image * num_anchors + anchor) * (width * cells) + cell  # [M] flat offsets
    flat_index = channel_0[:, None] + torch.arange(width, device=raw.device) * cells  # [M, 5+C]
    selected = head.reshape(-1).index_select(0, flat_index.reshape(-1))  # [M*(5+C)]
    selected = selected.view(-1, width)  # [M, 5+C]
    scores = objectness.index_select(0, index)[:, None] * selected[:, 5:].softmax(dim=1)
    anchor_wh = anchors.to(raw.device, raw.dtype).index_select(0, anchor)  # [M, 2]
    row, col = cell // grid_w, cell % grid_w
    boxes = cell_boxes(selected[:, 0:4], col, row, anchor_wh, grid_h, grid_w).clamp(0.0, 1.0)
    num_classes = width - 5
    pair = (scores.reshape(-1) > conf_threshold).nonzero().squeeze(1)  # [K] pred * C + class
    pred = pair // num_classes
    return (
        boxes.index_select(0, pred),
        scores.reshape(-1).index_select(0, pair),
        image.index_select(0, pred),
        pair % num_classes,
    )


def _nms_best_first(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image: torch.Tensor,
    groups: torch.Tensor,
    iou_threshold: float,
    *,
    batch_size: int,
    max_detections: int,
) -> torch.Tensor:
    """:func:`grouped_nms` of the candidates, enough of it for each image's ``max_detections``
    best kept boxes: int64 indices ``[K']``, ascending within each image.

    Greedy NMS decides a box from the higher-scored boxes of its group alone, so NMS of an
    image's ``PRUNE_FACTOR * max_detections`` best candidates decides those exactly as NMS of
    all of them would; when it keeps at least ``max_detections`` of them, nothing below can
    reach the image's top. Only the other images get NMS over all their candidates. (Exact as
    long as :func:`grouped_nms` is; past ``MAX_NMS_PAIRS`` it hands over to ``batched_nms``,
    whose CUDA kernel may order equal scores differently.)
    """
    limit = PRUNE_FACTOR * max_detections
    count = torch.bincount(image, minlength=batch_size)  # [N] candidates per image
    if count.numel() == 0 or int(count.max()) <= limit:
        return grouped_nms(boxes, scores, groups, iou_threshold)
    order = _sort_by(image, scores)  # [K] by image, then score: the NMS order within groups
    rank = torch.empty_like(order).index_copy_(0, order, _rank_in_run(count))  # [K] in image
    kept = _grouped_nms_of(
        (rank < limit).nonzero().squeeze(1), boxes, scores, groups, iou_threshold
    )
    short = (torch.bincount(image.index_select(0, kept), minlength=batch_size) < max_detections) & (
        count > limit
    )  # [N] images whose best candidates kept too few
    if not bool(short.any()):
        return kept
    in_short = short.index_select(0, image)  # [K]
    redone = _grouped_nms_of(in_short.nonzero().squeeze(1), boxes, scores, groups, iou_threshold)
    done = (~in_short.index_select(0, kept)).nonzero().squeeze(1)
    return torch.cat([kept.index_select(0, done), redone])


def _grouped_nms_of(
    subset: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """:func:`grouped_nms` of the candidates ``subset`` ``[S]`` (ascending indices) -> the
    kept ones among them, ascending."""
    kept = grouped_nms(
        boxes.index_select(0, subset),
        scores.index_select(0, subset),
        groups.index_select(0, subset),
        iou_threshold,
    )
    return subset.index_select(0, kept)


def grouped_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Greedy NMS within each group: boxes ``[K, 4]`` xyxy, scores ``[K]``, groups ``[K]``
    int64 -> int64 indices of the kept boxes, in the input order. Same result as
    ``torchvision.ops.batched_nms`` (which returns them by decreasing score)."""
    order = _sort_by(groups, scores)  # [K] by group, then score (highest first)
    _, count = torch.unique_consecutive(groups.index_select(0, order), return_counts=True)
    group_end = torch.cumsum(count, 0).repeat_interleave(count)  # [K]
    position = torch.arange(order.numel(), device=order.device)
    num_later = group_end - position - 1  # [K] lower-scored boxes of the same group
    if int(num_later.sum()) > MAX_NMS_PAIRS:
        return batched_nms(boxes, scores, groups, iou_threshold).sort().values
    first = position.repeat_interleave(num_later)  # [E] the higher-scored box of each pair
    pair_start = (torch.cumsum(num_later, 0) - num_later).index_select(0, first)  # [E]
    second = torch.arange(first.numel(), device=order.device) - pair_start + first + 1
    overlap = _pair_iou(boxes.index_select(0, order), first, second) > iou_threshold
    overlapping = overlap.nonzero().squeeze(1)  # [E']
    first, second = first.index_select(0, overlapping), second.index_select(0, overlapping)
    keep = torch.ones_like(position, dtype=torch.bool)  # [K] in sorted order
    while True:
        # a box is suppressed when any kept box of its group overlaps it from above
        hits = torch.zeros_like(position).index_add_(0, second, keep.index_select(0, first).long())
        if torch.equal(hits == 0, keep):
            kept = torch.zeros_like(keep).index_fill_(0, order.masked_select(keep), True)
            return kept.nonzero().squeeze(1)
        keep = hits == 0


def _pair_iou(boxes: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """IoU of the pairs (``boxes[first]``, ``boxes[second]``): boxes ``[K, 4]`` xyxy with
    ``x2 >= x1``, ``y2 >= y1``; ``first``/``second`` ``[E]`` -> ``[E]``. torchvision's nms
    formula, ``inter / (area1 + area2 - inter)`` (NaN for an empty union, never > threshold),
    so that every comparison comes out as torchvision's."""
    coords = boxes.t().contiguous()  # [4, K]: 1-D gathers of contiguous rows are fastest
    one = [row.index_select(0, first) for row in coords]  # 4 x [E]
    two = [row.index_select(0, second) for row in coords]  # 4 x [E]
    width = torch.minimum(one[2], two[2]).sub_(torch.maximum(one[0], two[0])).clamp_(min=0)
    height = torch.minimum(one[3], two[3]).sub_(torch.maximum(one[1], two[1])).clamp_(min=0)
    inter = width.mul_(height)  # [E]
    area = (coords[2] - coords[0]).mul_(coords[3] - coords[1])  # [K]
    union = area.index_select(0, first).add_(area.index_select(0, second)).sub_(inter)
    return inter.div_(union)


def _top_per_image(
    kept: torch.Tensor,
    scores: torch.Tensor,
    image: torch.Tensor,
    batch_size: int,
    max_detections: int,
) -> torch.Tensor:
    """``kept`` ``[K']`` candidate indices -> those among each image's ``max_detections``
    highest scores, ordered by image, then score (highest first; ties keep their order)."""
    kept_image = image.index_select(0, kept)  # [K']
    order = _sort_by(kept_image, scores.index_select(0, kept))  # [K'] by image, then score
    kept, kept_image = kept.index_select(0, order), kept_image.index_select(0, order)
    rank = _rank_in_run(torch.bincount(kept_image, minlength=batch_size))  # [K']
    return kept.index_select(0, (rank < max_detections).nonzero().squeeze(1))


def _rank_in_run(count: torch.Tensor) -> torch.Tensor:
    """Runs of ``count`` ``[N]`` elements laid end to end -> each element's position within
    its run, ``[sum(count)]`` int64."""
    start = (torch.cumsum(count, 0) - count).repeat_interleave(count)  # [sum(count)]
    return torch.arange(start.numel(), device=count.device) - start


def _sort_by(major: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Permutation ``[K]`` ordering by ``major`` ``[K]`` (int64, >= 0) ascending, then
    ``scores`` ``[K]`` descending (compared at float32 precision), then position: one stable
    sort of an int64 key instead of two sorts."""
    bits = scores.float().view(torch.int32).long()  # [K] float32 bit patterns
    monotone = torch.where(bits >= 0, bits, -(2**31) - 1 - bits)  # [K] ascending with score
    return torch.argsort(major * 2**32 + (2**31 - 1 - monotone), stable=True)


def _check_arguments(
    raw: torch.Tensor,
    anchors: torch.Tensor,
    conf_threshold: float,
    nms_threshold: float,
    max_detections: int,
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
    if max_detections < 1:
        raise ValueError(f"max_detections={max_detections}: must be at least 1")
