"""Inference from Python: ``load_detector(weights)`` -> a callable detector.

    from yolo import load_detector
    detector = load_detector("yolov2-voc")            # a release name, a .pt, a .weights file
    results = detector(["dog.jpg", pil_image, uint8_tensor])
    results[0].boxes_px, results[0].scores, results[0].labels, results[0].names
    detector.draw(results[0]).save("dog-boxes.jpg")

``boxes_px`` are ``[K, 4]`` float xyxy in the original image's continuous pixel frame
(``x1 * W``, ...: 0 at the left edge of the first pixel, ``W`` at the right edge of the last),
the frame torchvision's boxes use. ``detect.py`` runs through the same :class:`Detector`.

Errors are typed and say what to do: :class:`UnknownWeightsError` (a name that is no release and
no file: lists the releases), :class:`UnsupportedWeightsError` (a file of another kind: lists
the kinds accepted), :class:`ImageInputError` (an input that is no image, with its index).
"""

from __future__ import annotations

import os
from pathlib import Path

from yolo.predict import ImageInputError, Results

WEIGHT_SUFFIXES = (".pt", ".pth", ".weights", ".safetensors")
ACCEPTED_KINDS = (
    "a checkpoint of this project (.pt), its shared form (.safetensors), darknet's .weights "
    "(or darknet19_448.conv.23), or a release name"
)


class UnknownWeightsError(FileNotFoundError):
    """Neither a file nor the name of a published release."""


class UnsupportedWeightsError(ValueError):
    """A file that is none of the accepted kinds."""


__all__ = [
    "ImageInputError",
    "Results",
    "UnknownWeightsError",
    "UnsupportedWeightsError",
    "load_detector",
]


def check_weights_kind(weights: str) -> None:
    """Refuse an existing file that is none of the kinds accepted, before reading it."""
    path = Path(weights)
    if path.is_file() and path.suffix.lower() not in WEIGHT_SUFFIXES:
        if path.name == "darknet19_448.conv.23":
            return
        raise UnsupportedWeightsError(f"{path}: not a weights file; give {ACCEPTED_KINDS}")


def load_detector(
    weights: str | os.PathLike,
    *,
    device: str = "auto",
    img_size: int | None = None,
    conf_threshold: float = 0.25,
    nms_threshold: float = 0.45,
    letterbox: bool = False,
    amp: bool = True,
    model: str = "darknet19",
    classes: str | None = None,
    anchors: str | None = None,
):
    """A :class:`yolo.detect.Detector` in eval mode, with ``detect.py``'s defaults.

    ``weights``: a release name (``yolov2-voc``, ``yolov2-tiny-voc``, ``yolov2``), a
    checkpoint of this project (``.pt``, or its shared ``.safetensors`` form) or darknet's
    ``.weights`` (then ``model``, ``classes`` and ``anchors`` describe it). ``img_size``
    defaults to the size the weights were evaluated at. ``amp`` applies on CUDA only.
    """
    from yolo.config import DetectConfig
    from yolo.detect import build_detector

    weights = os.fspath(weights)
    check_weights_kind(weights)
    config = DetectConfig(
        weights=weights,
        model=model,
        classes=classes,
        anchors=anchors,
        img_size=img_size,
        letterbox=letterbox,
        conf_threshold=conf_threshold,
        nms_threshold=nms_threshold,
        device=device,
        amp=amp,
    )
    try:
        return build_detector(config)
    except FileNotFoundError as error:
        if Path(weights).exists():
            raise
        raise UnknownWeightsError(str(error)) from None
