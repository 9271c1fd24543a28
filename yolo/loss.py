"""YOLO v2 loss: darknet's region layer (``src/region_layer.c``) as a differentiable function.

Darknet does not differentiate a loss: it writes a *delta* (target minus output, scaled) for
every output entry and backpropagates it, passing the x, y and objectness deltas through the
logistic gradient. Each term below is the function whose gradient with respect to the raw
head output is minus that delta, so ``d total / d raw = -delta / N`` exactly:

- coord, for every responsible prediction, ``s = coord_scale * (2 - w*h)`` of its ground
  truth: ``s/2 * [(sig(tx) - x)^2 + (sig(ty) - y)^2 + (tw - log(w*W/aw))^2
  + (th - log(h*H/ah))^2]`` with ``x, y`` the centre's offsets in its cell, ``w, h`` the
  normalised size, ``W x H`` the grid and ``aw, ah`` the anchor in grid cells (darknet's
  ``DOABS`` branch of ``delta_region_box``): the target depends on the object's size in
  pixels, not on the input size;
- obj, for every responsible prediction: ``object_scale/2 * (sig(to) - iou)^2``, ``iou`` the
  IoU of the predicted box with its ground truth, detached (``rescore``; else 1);
- noobj, for every other prediction whose best IoU with any ground truth of its image is
  ``<= ignore_thresh``: ``noobject_scale/2 * sig(to)^2``;
- prior, while ``seen < prior_seen``, for every prediction not responsible for a ground truth:
  ``prior_scale/2 * [(sig(tx) - .5)^2 + (sig(ty) - .5)^2 + tw^2 + th^2]`` (the box of the
  cell's centre at exactly the anchor's size); ``prior_seen`` is darknet's 12800 images, a
  training run sets it from its schedule (at most ``--prior-share`` of the run's images);
- cls, for every responsible prediction: ``class_scale * cross_entropy(logits, class)``, whose
  gradient ``class_scale * (softmax - onehot)`` is darknet's softmax class delta.

Which predictions are responsible is :func:`yolo.converter.assign_targets`'s business
(``assignment="darknet"`` or ``"global"``).

Normalisation: every term is summed over the batch's predictions and divided by the batch size
N, a mean over images. Darknet sums the deltas of its 64-image batch and scales the update by
``learning_rate / 64``; SGD on this loss with the same learning rate, the gradients of
``accum`` batches of N images added after dividing each loss by ``accum``, takes the same step
for ``N * accum = 64``, and the step size does not depend on N or ``accum``.

The terms are computed in float32 (float64 if the raw output is float64) with autocast off, so
fp16/bf16 head outputs are fine. Non-finite terms raise a ``ValueError`` naming them.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.boxes import box_iou_elementwise, cxcywh_to_xyxy
from yolo.converter import (
    ASSIGNMENTS,
    MIN_BOX_SIZE,
    Assignment,
    assign_targets,
    decode_boxes,
    flatten_predictions,
)

__all__ = ["LOSS_TERMS", "YOLOv2Loss"]

LOSS_TERMS = ("coord", "obj", "noobj", "cls", "prior")


class YOLOv2Loss(nn.Module):
    """Darknet's region-layer loss; see the module docstring for the terms.

    ``anchors`` ``[A, 2]``: (width, height) in cells of the output grid, the same at every
    input size. ``forward(raw, targets, seen)``: ``raw`` ``[N, A*(5+C), H, W]`` head output,
    ``targets`` ``[N, G, 5]`` rows (class, cx, cy, w, h) normalised, class ``-1`` for padding,
    ``seen`` the number of images trained on so far. Returns a dict of scalar tensors: the
    terms ``coord``, ``obj``, ``noobj``, ``cls``, ``prior`` and their sum ``total`` (float),
    and ``num_dropped`` (int64, not a loss): valid ground truths left without a predictor (in
    "darknet" mode overwritten by a later one in the same cell and anchor; in "global" mode the
    excess of a cell holding more ground truths than anchors).
    """

    def __init__(
        self,
        anchors: torch.Tensor,
        num_classes: int,
        *,
        object_scale: float = 5.0,
        noobject_scale: float = 1.0,
        class_scale: float = 1.0,
        coord_scale: float = 1.0,
        ignore_thresh: float = 0.6,
        prior_scale: float = 0.01,
        prior_seen: int = 12800,
        rescore: bool = True,
        assignment: str = "global",
    ) -> None:
        super().__init__()
        anchors = torch.as_tensor(anchors)
        if not anchors.is_floating_point():
            anchors = anchors.float()
        if anchors.ndim != 2 or anchors.shape[1] != 2 or not bool((anchors > 0).all()):
            raise ValueError(
                f"anchors must be a [A, 2] tensor of positive (width, height) in grid cells "
                f"(darknet's anchors= numbers), got shape {tuple(anchors.shape)}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one class")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment={assignment!r} is not one of {ASSIGNMENTS}")
        # Kept in the given float dtype and cast per call: float64 anchors give exact float64 tests.
        self.register_buffer("anchors", anchors.clone(), persistent=False)
        self.num_classes = num_classes
        self.object_scale = object_scale
        self.noobject_scale = noobject_scale
        self.class_scale = class_scale
        self.coord_scale = coord_scale
        self.ignore_thresh = ignore_thresh
        self.prior_scale = prior_scale
        self.prior_seen = prior_seen
        self.rescore = rescore
        self.assignment = assignment

    def forward(
        self, raw: torch.Tensor, targets: torch.Tensor, seen: int
    ) -> dict[str, torch.Tensor]:
        self._check_inputs(raw, targets)
        dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
        with torch.autocast(raw.device.type, enabled=False):
            terms, num_dropped = self._terms(raw.to(dtype), targets.to(dtype), seen)
        _check_finite(terms)
        terms["total"] = sum(terms.values())
        terms["num_dropped"] = num_dropped
        return terms

    def _terms(
        self, raw: torch.Tensor, targets: torch.Tensor, seen: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Float ``raw`` ``[N, A*(5+C), H, W]`` and ``targets`` ``[N, G, 5]`` -> the five
        terms (scalars, divided by N) and the dropped count."""
        batch_size, _, grid_h, grid_w = raw.shape
        anchors = self.anchors.to(raw.dtype)
        flat = flatten_predictions(raw, anchors.shape[0])  # [N, P, 5+C]
        iou = _prediction_iou(flat, targets, anchors, grid_h, grid_w)  # [N, P, G]
        best_iou = iou.amax(dim=2) if iou.shape[2] else iou.new_zeros(iou.shape[:2])  # [N, P]
        match = assign_targets(targets, anchors, grid_h, grid_w, self.assignment)
        responsible = torch.zeros_like(best_iou, dtype=torch.bool)  # [N, P]
        responsible[match.batch_index, match.pred_index] = True
        terms = self._matched_terms(flat, targets, iou, match, anchors, grid_h, grid_w)
        objectness = flat[..., 4].sigmoid()  # [N, P]
        noobj_mask = (best_iou <= self.ignore_thresh) & ~responsible
        terms["noobj"] = 0.5 * self.noobject_scale * (objectness.square() * noobj_mask).sum()
        terms["prior"] = flat.new_zeros(())
        if seen < self.prior_seen:
            pull = (flat[..., 0:2].sigmoid() - 0.5).square().sum(-1)  # [N, P]
            pull = pull + flat[..., 2:4].square().sum(-1)  # [N, P]
            terms["prior"] = 0.5 * self.prior_scale * (pull * ~responsible).sum()
        terms = {name: terms[name] / batch_size for name in LOSS_TERMS}
        return terms, match.num_dropped

    def _matched_terms(
        self,
        flat: torch.Tensor,
        targets: torch.Tensor,
        iou: torch.Tensor,
        match: Assignment,
        anchors: torch.Tensor,
        grid_h: int,
        grid_w: int,
    ) -> dict[str, torch.Tensor]:
        """coord, obj and cls sums over the responsible predictions of ``match``.

        ``flat`` ``[N, P, 5+C]`` raw, ``targets`` ``[N, G, 5]``, ``iou`` ``[N, P, G]``
        detached IoU of every prediction with every ground truth.
        """
        pred = flat[match.batch_index, match.pred_index]  # [T, 5+C]
        truth = targets[match.batch_index, match.target_index]  # [T, 5]
        grid = truth.new_tensor([grid_w, grid_h])  # [2]
        offset = truth[:, 1:3] * grid - torch.stack([match.col, match.row], dim=1)  # [T, 2]
        size_cells = truth[:, 3:5].clamp(min=MIN_BOX_SIZE) * grid  # [T, 2]
        log_size = torch.log(size_cells / anchors[match.anchor])  # [T, 2]
        scale = self.coord_scale * (2.0 - truth[:, 3] * truth[:, 4])  # [T]
        coord_error = (pred[:, 0:2].sigmoid() - offset).square().sum(1) + (
            pred[:, 2:4] - log_size
        ).square().sum(1)  # [T]
        own_iou = iou[match.batch_index, match.pred_index, match.target_index]  # [T]
        obj_target = own_iou if self.rescore else torch.ones_like(own_iou)
        obj_error = (pred[:, 4].sigmoid() - obj_target).square()  # [T]
        cls = F.cross_entropy(pred[:, 5:], truth[:, 0].long(), reduction="sum")
        return {
            "coord": 0.5 * (scale * coord_error).sum(),
            "obj": 0.5 * self.object_scale * obj_error.sum(),
            "cls": self.class_scale * cls,
        }

    def _check_inputs(self, raw: torch.Tensor, targets: torch.Tensor) -> None:
        num_anchors = self.anchors.shape[0]
        expected = num_anchors * (5 + self.num_classes)
        if raw.ndim != 4 or raw.shape[1] != expected:
            raise ValueError(
                f"raw output of shape {tuple(raw.shape)}: expected [N, {expected}, H, W] for "
                f"{num_anchors} anchors and {self.num_classes} classes"
            )
        if targets.ndim != 3 or targets.shape[2] != 5 or targets.shape[0] != raw.shape[0]:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)}: expected [{raw.shape[0]}, G, 5] rows "
                f"(class, cx, cy, w, h), class -1 for padding"
            )
        if targets.numel() and int(targets[..., 0].max()) >= self.num_classes:
            raise ValueError(
                f"a target has class {int(targets[..., 0].max())}, but num_classes="
                f"{self.num_classes}: check the dataset's class list against the model"
            )


def _prediction_iou(
    flat: torch.Tensor,
    targets: torch.Tensor,
    anchors: torch.Tensor,
    grid_h: int,
    grid_w: int,
) -> torch.Tensor:
    """Detached IoU of every predicted box with every ground truth of its image.

    ``flat`` ``[N, P, 5+C]`` raw, ``targets`` ``[N, G, 5]`` -> ``[N, P, G]``, 0 for padding.
    Memory and time O(N * P * G).
    """
    with torch.no_grad():
        boxes = decode_boxes(flat, anchors, grid_h, grid_w)  # [N, P, 4]
        truth = cxcywh_to_xyxy(targets[..., 1:5])  # [N, G, 4]
        iou = box_iou_elementwise(boxes[:, :, None, :], truth[:, None, :, :])  # [N, P, G]
        return iou.masked_fill(targets[:, None, :, 0] < 0, 0.0)


def _check_finite(terms: dict[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` naming every non-finite term (one device sync)."""
    values = torch.stack(list(terms.values())).detach()
    if bool(torch.isfinite(values).all()):
        return
    bad = ", ".join(
        f"{name}={value:g}"
        for name, value in zip(terms, values.tolist(), strict=True)
        if not math.isfinite(value)
    )
    raise ValueError(
        f"non-finite loss terms: {bad}; the raw head output holds inf or NaN (diverged "
        "training: lower the learning rate, or check the input images and targets)"
    )
