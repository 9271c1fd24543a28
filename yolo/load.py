"""Loading what inference needs: ``--weights`` (a checkpoint of this project, a darknet
.weights file or the name of darknet's published weights), class names and anchors, and the
model they make in eval mode. Used by the test, detect and export engines; training reads its
initial weights through :func:`find_weights` too."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from utils.anchors import default_anchors, load_anchors
from utils.data import VOC_CLASSES
from utils.voc import load_classes
from yolo.checkpoint import load_checkpoint, load_model_weights
from yolo.model import build_model
from yolo.weights import DARKNET_RELEASES, ResolvedWeights, resolve_weights

log = logging.getLogger(__name__)

DARKNET_IMG_SIZE = 416  # what yolov2-voc.cfg evaluates at


def resolve_classes(classes_file: str | None) -> tuple[str, ...]:
    return load_classes(classes_file) if classes_file else VOC_CLASSES


def resolve_anchors(anchors_file: str | None) -> torch.Tensor:
    """``[A, 2]`` anchors in grid cells: the file's, a darknet release's (``--anchors yolov2``
    names yolov2.cfg's COCO set), else darknet's VOC set."""
    if anchors_file in DARKNET_RELEASES and not Path(anchors_file).exists():
        anchors = DARKNET_RELEASES[anchors_file].anchors
        if anchors is not None:
            return torch.tensor(anchors, dtype=torch.float32)
    return load_anchors(anchors_file) if anchors_file else default_anchors()


class TrainedModel(NamedTuple):
    """A model ready for inference and what it needs: its class names, its anchors ``[A, 2]``
    (grid cells) and the input size it was evaluated at in training."""

    model: nn.Module
    classes: tuple[str, ...]
    anchors: torch.Tensor
    img_size: int


def find_weights(weights: str) -> ResolvedWeights:
    """``--weights``: a file, or the name of darknet's published weights (downloaded once)."""
    try:
        return resolve_weights(weights)
    except FileNotFoundError as error:
        if Path(weights).suffix or "/" in weights:  # a path, not a mistyped name
            raise FileNotFoundError(
                f"weights {weights} not found: a run's own weights are model/<run>/best.pt; "
                f"darknet's can be named: {', '.join(DARKNET_RELEASES)}"
            ) from None
        raise FileNotFoundError(f"{error}; a run's own weights are model/<run>/best.pt") from None


def load_trained_model(
    weights: str, *, model_name: str, classes_file: str | None, anchors_file: str | None
) -> TrainedModel:
    """A model in eval mode from a project checkpoint (.pt), a darknet .weights file or the
    name of darknet's published weights (e.g. ``yolov2-voc``).

    A darknet file takes ``model_name``, ``classes_file`` and ``anchors_file`` (default VOC's
    classes and darknet's anchors) and is evaluated at 416; a named release and a checkpoint
    supply their own model, classes, anchors and evaluation size, and a warning says so where
    the files given differ from them.
    """
    found = find_weights(weights)
    path = found.path
    if found.classes is not None:  # a named darknet release
        _warn_ignored(classes_file, anchors_file, found.classes, found.anchors, found.name)
        model = build_model(found.model, num_classes=len(found.classes),
                            num_anchors=len(found.anchors), pretrained=str(path))  # fmt: skip
        return TrainedModel(model.eval(), found.classes, found.anchors, found.img_size)
    if path.suffix == ".weights":
        classes = resolve_classes(classes_file)
        anchors = resolve_anchors(anchors_file)
        model = build_model(
            model_name, num_classes=len(classes), num_anchors=len(anchors), pretrained=str(path)
        )
        return TrainedModel(model.eval(), classes, anchors, DARKNET_IMG_SIZE)
    state = load_checkpoint(path)
    classes = tuple(state["classes"])
    anchors = torch.tensor(state["anchors"], dtype=torch.float32)
    _warn_ignored(classes_file, anchors_file, classes, anchors, f"checkpoint {path}")
    model = build_model(state["config"]["model"], num_classes=len(classes),
                        num_anchors=len(anchors))  # fmt: skip
    load_model_weights(model, state["model"], str(path))
    img_size = state["config"].get("eval_img_size", DARKNET_IMG_SIZE)
    return TrainedModel(model.eval(), classes, anchors, img_size)


def _warn_ignored(classes_file, anchors_file, classes, anchors, source: str) -> None:
    """Say where ``--classes``/``--anchors`` name other values than the weights hold."""
    if classes_file and resolve_classes(classes_file) != classes:
        log.warning("--classes %s ignored: %s holds its own", classes_file, source)
    if anchors_file and not torch.equal(resolve_anchors(anchors_file), anchors):
        log.warning("--anchors %s ignored: %s holds its own", anchors_file, source)


def require_weights(config) -> None:
    """Test, detect and export need ``--weights``; say which kinds it takes."""
    if not config.weights:
        raise ValueError(
            "--weights is required: a checkpoint of this project (model/<run>/best.pt), "
            "darknet's .weights file, or a name such as yolov2-voc"
        )
