"""What a detector returns to Python callers, and the inputs it takes.

:class:`Results` holds one image's detections in its own pixels; :func:`to_pil` turns a path, a
PIL image or a uint8 ``[3, H, W]`` tensor into the RGB PIL image inference reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from PIL import Image


class ImageInputError(ValueError):
    """An input of a batch that is not an image (a path that does not decode, a wrong tensor)."""


@dataclass(frozen=True)
class Results:
    """One image's detections, highest score first.

    ``boxes_px`` ``[K, 4]`` float32 xyxy in the image's pixels, continuous (``x1 * W``, ...:
    0 at the left edge of the first pixel, ``W`` at the right edge of the last); ``boxes`` the
    same normalised to [0, 1]; ``scores`` ``[K]``; ``labels`` ``[K]`` int64 class indices;
    ``names`` the class name of each detection; ``image_size`` (height, width) of the original
    image; ``image`` the image itself.
    """

    boxes_px: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...]
    image_size: tuple[int, int]
    image: Image.Image | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def detections(self) -> torch.Tensor:
        """``[K, 6]`` (x1, y1, x2, y2, score, class), normalised: the project's own format."""
        return torch.cat([self.boxes, self.scores[:, None], self.labels[:, None].float()], dim=1)


def make_results(detections: torch.Tensor, image: Image.Image, class_names) -> Results:
    """``[K, 6]`` normalised detections of ``image`` -> :class:`Results` (keeps the image, for
    drawing)."""
    width, height = image.size
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
        image=image,
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
