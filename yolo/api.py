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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

WEIGHT_SUFFIXES = (".pt", ".pth", ".weights", ".safetensors")
ACCEPTED_KINDS = (
    "a checkpoint of this project (.pt), its shared form (.safetensors), darknet's .weights "
    "(or darknet19_448.conv.23), or a release name"
)


class UnknownWeightsError(FileNotFoundError):
    """Neither a file nor the name of a published release."""


class UnsupportedWeightsError(ValueError):
    """A file that is none of the accepted kinds."""


class ImageInputError(ValueError):
    """An input of a batch that is not an image (a path that does not decode, a wrong tensor)."""


@dataclass(frozen=True)
class Results:
    """One image's detections, highest score first.

    ``boxes_px`` ``[K, 4]`` float32 xyxy in the image's pixels (continuous frame, see the
    module docstring); ``boxes`` the same normalised to [0, 1]; ``scores`` ``[K]``;
    ``labels`` ``[K]`` int64 class indices; ``names`` the class name of each detection;
    ``image_size`` (height, width) of the original image.
    """

    boxes_px: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def detections(self) -> torch.Tensor:
        """``[K, 6]`` (x1, y1, x2, y2, score, class), normalised: the project's own format."""
        return torch.cat([self.boxes, self.scores[:, None], self.labels[:, None].float()], dim=1)


def make_results(
    detections: torch.Tensor, image_size: tuple[int, int], class_names: Sequence[str]
) -> Results:
    """``[K, 6]`` normalised detections of an image of ``image_size`` (height, width) ->
    :class:`Results`."""
    height, width = image_size
    detections = detections.detach().float().cpu()
    boxes = detections[:, :4]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    labels = detections[:, 5].long()
    return Results(
        boxes_px=boxes * scale,  # [K, 4] pixels
        boxes=boxes,
        scores=detections[:, 4],
        labels=labels,
        names=tuple(class_names[i] for i in labels.tolist()),
        image_size=(height, width),
    )


def to_pil(item, index: int) -> Image.Image:
    """One input of a batch -> an upright RGB PIL image: a path (decoded as training reads it),
    a PIL image (converted to RGB), or a uint8 ``[3, H, W]`` tensor (RGB)."""
    from utils.images import UnreadableImage, load_rgb, to_rgb

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, str | os.PathLike):
        try:
            return load_rgb(item)[0]
        except (OSError, UnreadableImage) as error:
            raise ImageInputError(f"image {index} ({item}): cannot read it ({error})") from None
    if torch.is_tensor(item):
        if item.dtype != torch.uint8 or item.dim() != 3 or item.shape[0] != 3:
            raise ImageInputError(
                f"image {index}: a tensor must be uint8 [3, H, W] RGB, got {item.dtype} "
                f"{list(item.shape)}"
            )
        return Image.fromarray(item.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB")  # HWC
    raise ImageInputError(
        f"image {index}: a {type(item).__name__}; give a path, a PIL image or a uint8 "
        "[3, H, W] tensor"
    )


def as_batch(images) -> list:
    """A single input or a sequence of inputs -> a list of inputs."""
    if isinstance(images, str | os.PathLike | Image.Image):
        return [images]
    if torch.is_tensor(images):
        return list(images) if images.dim() == 4 else [images]  # [N, 3, H, W] -> N images
    return list(images)


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
