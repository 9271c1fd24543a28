"""Model output <=> boxes: decoding the raw head and assigning ground truths to predictors.

The raw head output is ``[N, A*(5+C), H, W]``, channel ``a*(5+C)+k`` with k = tx, ty, tw, th,
to, then C class logits (darknet's region-layer order). Flattened predictions are indexed
``(row*W + col)*A + a``. Anchors ``[A, 2]`` are (width, height) in cells of the output grid
(darknet's ``anchors=`` numbers): a prediction's box is ``exp(tw) * anchor_w / W`` of the image
wide (darknet's ``get_region_box``), W the width of the grid the raw tensor has, so an anchor
is fixed in pixels (32 per cell) at every input size. The grid need not be square.

Target assignment follows darknet's region layer (``src/region_layer.c``, ``bias_match=1``):
a ground truth goes to the cell holding its centre (``col = floor(cx*W)``, clamped so that a
centre at exactly 1.0 falls in the last cell) and to the anchor of best shape IoU, the IoU of
its size in cells ``(w*W, h*H)`` and the anchor centred on each other (first anchor on ties,
as darknet's strict ``>``). Two ground truths *compete* when they pick the same (cell, anchor)
of one image.

- ``"darknet"``: the later ground truth (higher row of the targets) overwrites the earlier
  one, as darknet's loop over truths writes the same delta entries; the overwritten ones are
  counted as dropped.
- ``"global"``: cells without competition keep darknet's choice. In a cell where ground truths
  compete, the cell's ground truths get distinct anchors of that cell (never another cell's)
  chosen to maximise their total shape IoU, exactly (:func:`match_max_total_iou`). Shape IoU
  (not the IoU of the current predictions) keeps the choice independent of the network's
  state and equal to darknet's wherever nobody competes. A cell holding more ground truths
  than anchors keeps the ``A`` whose matching has the largest total IoU; the others get no
  predictor and are counted as dropped. Ties between optimal matchings are broken
  deterministically.

Padding rows of the targets (class ``-1``) may sit anywhere and are ignored.
"""

from typing import NamedTuple

import torch

from utils.boxes import cxcywh_to_xyxy, wh_iou
from yolo.names import ASSIGNMENTS

__all__ = [
    "ASSIGNMENTS",
    "MIN_BOX_SIZE",
    "Assignment",
    "assign_targets",
    "cell_boxes",
    "decode",
    "decode_boxes",
    "flatten_predictions",
    "match_max_total_iou",
]

# Widths and heights below this fraction of the image are raised to it: log(0) has no value.
MIN_BOX_SIZE = 1e-6


def flatten_predictions(raw: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """``[N, A*(5+C), H, W]`` raw head -> ``[N, H*W*A, 5+C]``, index ``(row*W + col)*A + a``."""
    n, channels, grid_h, grid_w = raw.shape
    if channels % num_anchors or channels // num_anchors < 6:
        raise ValueError(
            f"raw output has {channels} channels, not num_anchors*(5+num_classes) with "
            f"num_anchors={num_anchors}: check the anchors against the model's head"
        )
    per_anchor = channels // num_anchors
    flat = raw.view(n, num_anchors, per_anchor, grid_h, grid_w)  # [N, A, 5+C, H, W]
    flat = flat.permute(0, 3, 4, 1, 2)  # [N, H, W, A, 5+C]
    return flat.reshape(n, grid_h * grid_w * num_anchors, per_anchor)  # [N, H*W*A, 5+C]


def _cell_offsets(
    grid_h: int, grid_w: int, num_anchors: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row of every flattened prediction: two ``[H*W*A]`` tensors like ``like``."""
    index = torch.arange(grid_h * grid_w * num_anchors, device=like.device)
    cell = index // num_anchors
    return (cell % grid_w).to(like.dtype), (cell // grid_w).to(like.dtype)


def cell_boxes(
    offsets: torch.Tensor,
    col: torch.Tensor,
    row: torch.Tensor,
    anchor_wh: torch.Tensor,
    grid_h: int,
    grid_w: int,
) -> torch.Tensor:
    """Boxes of predictions from their raw (tx, ty, tw, th), as darknet's ``get_region_box``.

    ``offsets`` ``[..., 4]`` raw values, ``col``/``row`` ``[...]`` the cell, ``anchor_wh``
    ``[..., 2]`` the anchor in grid cells; all broadcast -> ``[..., 4]`` normalised xyxy, not
    clipped: centre ``((col, row) + sigmoid(tx, ty)) / (W, H)``, size
    ``exp(tw, th) * anchor / (W, H)``.
    """
    centre_x = (col + offsets[..., 0].sigmoid()) / grid_w  # [...]
    centre_y = (row + offsets[..., 1].sigmoid()) / grid_h  # [...]
    width = offsets[..., 2].exp() * anchor_wh[..., 0] / grid_w  # [...]
    height = offsets[..., 3].exp() * anchor_wh[..., 1] / grid_h  # [...]
    return cxcywh_to_xyxy(torch.stack([centre_x, centre_y, width, height], dim=-1))


def decode_boxes(
    flat: torch.Tensor, anchors: torch.Tensor, grid_h: int, grid_w: int
) -> torch.Tensor:
    """Predicted boxes of flattened predictions.

    ``flat`` ``[N, H*W*A, 5+C]`` raw values of an ``H`` x ``W`` grid (see
    :func:`flatten_predictions`), ``anchors`` ``[A, 2]`` in grid cells -> ``[N, H*W*A, 4]``
    normalised xyxy, not clipped, dtype of ``flat``.
    """
    num_anchors = anchors.shape[0]
    col, row = _cell_offsets(grid_h, grid_w, num_anchors, flat)  # [P], [P]
    anchor_wh = anchors.to(flat.dtype).repeat(grid_h * grid_w, 1)  # [P, 2]
    return cell_boxes(flat[..., 0:4], col, row, anchor_wh, grid_h, grid_w)


def decode(
    raw: torch.Tensor, anchors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode the raw head.

    ``raw`` ``[N, A*(5+C), H, W]``, ``anchors`` ``[A, 2]`` in grid cells ->
    boxes ``[N, H*W*A, 4]`` normalised xyxy (not clipped), objectness ``[N, H*W*A]`` (sigmoid),
    class_probs ``[N, H*W*A, C]`` (softmax). Prediction index ``(row*W + col)*A + a``.
    """
    _, _, grid_h, grid_w = raw.shape
    flat = flatten_predictions(raw, anchors.shape[0])  # [N, P, 5+C]
    boxes = decode_boxes(flat, anchors, grid_h, grid_w)
    return boxes, flat[..., 4].sigmoid(), flat[..., 5:].softmax(dim=-1)


class Assignment(NamedTuple):
    """Ground truths that own a predictor: one entry per such ground truth, all ``[T]`` int64.

    ``batch_index`` and ``target_index`` address the targets row; ``pred_index`` is the
    flattened prediction ``(row*W + col)*A + a`` of that image; ``anchor`` is ``a``;
    ``col``/``row`` the cell. ``num_dropped`` (scalar int64) counts valid ground truths left
    without a predictor of their own.
    """

    batch_index: torch.Tensor
    target_index: torch.Tensor
    pred_index: torch.Tensor
    anchor: torch.Tensor
    col: torch.Tensor
    row: torch.Tensor
    num_dropped: torch.Tensor


def assign_targets(
    targets: torch.Tensor,
    anchors: torch.Tensor,
    grid_h: int,
    grid_w: int,
    mode: str = "global",
) -> Assignment:
    """Assign every valid ground truth of ``targets`` ``[N, G, 5]`` (class, cx, cy, w, h
    normalised; class ``-1`` = padding) to a predictor of a ``grid_h`` x ``grid_w`` grid with
    ``anchors`` ``[A, 2]`` in grid cells, in the ``mode`` the module docstring describes.
    Vectorised over the batch."""
    if mode not in ASSIGNMENTS:
        raise ValueError(f"assignment={mode!r} is not one of {ASSIGNMENTS}")
    num_anchors = anchors.shape[0]
    batch_index, target_index = (targets[..., 0] >= 0).nonzero(as_tuple=True)  # [T], [T]
    boxes = targets[batch_index, target_index, 1:5]  # [T, 4] cxcywh
    col = (boxes[:, 0] * grid_w).floor().long().clamp_(0, grid_w - 1)
    row = (boxes[:, 1] * grid_h).floor().long().clamp_(0, grid_h - 1)
    size = boxes[:, 2:4].clamp(min=MIN_BOX_SIZE) * boxes.new_tensor([grid_w, grid_h])  # [T, 2]
    shape_iou = wh_iou(size[:, None, :], anchors.to(size.dtype)[None])  # [T, A], in cells
    cell = (batch_index * grid_h + row) * grid_w + col  # [T] cell key unique in the batch
    best = shape_iou.argmax(dim=1)  # [T] first maximum, as darknet's strict ">"
    if mode == "darknet":
        anchor = _last_writer_wins(best, cell, num_anchors)
    else:
        anchor = _global_anchors(cell, best, shape_iou)
    keep = anchor >= 0
    anchor = anchor[keep]
    col, row = col[keep], row[keep]
    return Assignment(
        batch_index=batch_index[keep],
        target_index=target_index[keep],
        pred_index=(row * grid_w + col) * num_anchors + anchor,
        anchor=anchor,
        col=col,
        row=row,
        num_dropped=(~keep).sum(),
    )


def _last_writer_wins(best: torch.Tensor, cell: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """``best`` ``[T]`` anchor and ``cell`` ``[T]`` cell key of each ground truth, in target
    order -> ``[T]`` the anchor for the last ground truth of every (cell, anchor), ``-1`` for
    the ones it overwrites."""
    _, slot = torch.unique(cell * num_anchors + best, return_inverse=True)  # [T]
    order = torch.arange(slot.numel(), device=slot.device)
    owner = torch.full_like(order, -1).scatter_reduce_(0, slot, order, reduce="amax")
    return torch.where(owner[slot] == order, best, -1)


def _global_anchors(
    cell: torch.Tensor, best: torch.Tensor, shape_iou: torch.Tensor
) -> torch.Tensor:
    """``cell`` ``[T]``, ``best`` ``[T]`` darknet's anchor, ``shape_iou`` ``[T, A]`` ->
    ``[T]`` anchor per ground truth (``-1``: dropped), distinct within every cell."""
    num_anchors = shape_iou.shape[1]
    _, slot_inverse, slot_count = torch.unique(
        cell * num_anchors + best, return_inverse=True, return_counts=True
    )
    contested_cells = cell[slot_count[slot_inverse] > 1]
    if contested_cells.numel() == 0:
        return best
    member = torch.isin(cell, contested_cells).nonzero().squeeze(1)  # [Tm]
    group_cells, group, group_count = torch.unique(
        cell[member], return_inverse=True, return_counts=True
    )
    order = torch.argsort(group, stable=True)  # members grouped by cell, target order kept
    start = torch.cumsum(group_count, 0) - group_count  # [M]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start[group[order]]
    weights = shape_iou.new_full((group_cells.numel(), int(group_count.max()), num_anchors), -1.0)
    weights[group, rank] = shape_iou[member]  # [M, K, A]; -1 marks an empty row
    matched = match_max_total_iou(weights)  # [M, K]
    anchor = best.clone()
    anchor[member] = matched[group, rank]
    return anchor


def match_max_total_iou(weights: torch.Tensor) -> torch.Tensor:
    """Exact maximum-weight matching of rows to anchors, for many small problems at once.

    ``weights`` ``[M, K, A]`` float: problem m, ground truth k, anchor a; a negative weight
    forbids the pair (padding rows). Returns ``[M, K]`` int64: the anchor of each row or
    ``-1``; anchors are distinct within a problem and the total weight is maximal.

    Dynamic programme over subsets of anchors: after row k, ``value[m, s]`` is the best total
    of rows ``<= k`` using exactly the anchor set ``s`` (a row may stay unmatched). Cost
    ``O(M * K * 2**A * A)``; the loop runs over rows, at most the ground truths of one cell.

    Example, rows ``[[0.9, 0.8], [0.7, 0.1]]`` (two anchors): after row 0, value(∅) = 0,
    value({0}) = 0.9, value({1}) = 0.8; after row 1, value({0, 1}) = max(value({1}) + 0.7,
    value({0}) + 0.1) = 1.5, the best of all sets, so row 0 takes anchor 1 and row 1 anchor 0,
    where each row's own best anchor (0 for both) would collide and greedy would total 1.0.
    """
    num_problems, num_rows, num_anchors = weights.shape
    device = weights.device
    subsets = torch.arange(1 << num_anchors, device=device)  # [S]
    bit = 1 << torch.arange(num_anchors, device=device)  # [A]
    has_anchor = (subsets[:, None] & bit) != 0  # [S, A]
    without = subsets[:, None] ^ bit  # [S, A] subset s minus anchor a (where present)
    value = weights.new_full((num_problems, subsets.numel()), float("-inf"))
    value[:, 0] = 0.0
    choices = []
    for k in range(num_rows):
        allowed = has_anchor & (weights[:, k, None, :] >= 0)  # [M, S, A]
        gain = value[:, without] + weights[:, k, None, :]  # [M, S, A]
        take, take_anchor = gain.masked_fill(~allowed, float("-inf")).max(dim=2)  # [M, S]
        use = take > value
        value = torch.where(use, take, value)
        choices.append(torch.where(use, take_anchor, -1))
    subset = value.argmax(dim=1)  # [M]
    matched = torch.full((num_problems, num_rows), -1, dtype=torch.long, device=device)
    for k in reversed(range(num_rows)):
        anchor = choices[k].gather(1, subset[:, None]).squeeze(1)  # [M]
        matched[:, k] = anchor
        subset = torch.where(anchor >= 0, subset ^ (1 << anchor.clamp(min=0)), subset)
    return matched
