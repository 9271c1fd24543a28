"""Joint (image, target) transforms that prepare images as darknet does, in float RGB.

A transform takes a PIL RGB image and a target dict (``"boxes"`` ``[G, 4]`` float32 normalised
xyxy, ``"labels"`` ``[G]`` int64, ``"difficult"`` ``[G]`` bool, plus any other keys, which pass
through) and returns a float32 tensor ``[3, S, S]`` RGB in [0, 1] and a new target dict.

Every resize is darknet's ``resize_image`` (``src/image.c``): bytes / 255 to float, separable
bilinear with ``scale = (in - 1) / (out - 1)`` (corners aligned), no antialiasing (and the
multi-scale ``resize_batch`` aligns corners too). Evaluation
resizes the whole image (the boxes stay those of the original image) or, with ``letterbox``,
embeds it as darknet's ``letterbox_image`` does (:func:`unletterbox_boxes` maps detections
back). Training follows darknet's ``load_data_detection`` (yolov2 era, ``src/data.c``):

- jitter crop: with ``dw = int(jitter * w)`` and ``dh = int(jitter * h)``, four integer offsets
  ``pleft, pright ~ U(-dw, dw)`` and ``ptop, pbot ~ U(-dh, dh)`` (truncated towards zero) cut the
  window ``[pleft, w - pright) x [ptop, h - pbot)``; pixels outside the image repeat the nearest
  edge pixel (``crop_image`` clamps its coordinates); the window is resized to ``S x S``;
- horizontal flip with probability ``flip_p`` (darknet: 0.5);
- HSV distortion (``random_distort_image``): hue shifted by ``U(-hue, hue)`` of the circle,
  saturation and value multiplied by ``rand_scale(saturation)`` and ``rand_scale(exposure)``
  (``U(1, s)``, inverted with probability 0.5), back to RGB, clamped to [0, 1];
- boxes as ``correct_boxes``: the window's edges become the image's, flipped, clipped to
  [0, 1]; boxes narrower or lower than ``min_box_size`` are dropped (``fill_truth_detection``
  drops ``w < .001 or h < .001``).

Every random number comes from torch's global generator, so a caller that seeds it (the dataset
does, per item) gets reproducible augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.darknet_aug import DARKNET_AUGMENTATION as AUG

__all__ = [
    "DarknetParams",
    "DarknetTrainTransform",
    "EvalTransform",
    "build_eval_transform",
    "build_train_transform",
    "distort_hsv",
    "hsv_to_rgb",
    "letterbox_image",
    "letterbox_size",
    "resize_batch",
    "resize_image",
    "rgb_to_hsv",
    "sample_darknet_params",
    "unletterbox_boxes",
    "unletterbox_detections",
]

_TINY = torch.finfo(torch.float32).tiny
LETTERBOX_FILL = 0.5  # darknet's fill_image(boxed, .5)


def _as_float(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> float32 0/1. Through uint8: torch casts bool to float 10 times slower."""
    return mask.view(torch.uint8).to(torch.float32)


def _check_size(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size <= 0 or img_size % 32:
        raise ValueError(f"img_size must be a positive multiple of 32, got {img_size!r}")


def _pil_to_hwc(image: Image.Image) -> np.ndarray:
    """PIL RGB image -> ``[H, W, 3]`` uint8 array (a writable copy)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return np.array(image)


def _to_float(pixels: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` float32 in [0, 1] (darknet's ``/255.``), keeping
    channels-last strides: ``F.interpolate`` is faster on them."""
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)  # [3, H, W] view
    return chw.float().div_(255.0)


def _bilinear(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[..., C, h, w]`` float -> ``[..., C, height, width]``, corners aligned, no antialias."""
    batch = image.reshape(-1, *image.shape[-3:])  # [N, C, h, w]
    out = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=True)
    return out.reshape(*image.shape[:-2], height, width)  # [..., C, height, width]


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """darknet's ``resize_image``: ``[3, h, w]`` float32 -> ``[3, height, width]`` float32.

    Corner-aligned bilinear without antialiasing, which is what ``F.interpolate`` computes in
    float32 (a test holds the two within 1e-6). darknet's vertical pass gives its last row only
    ``(1 - dy) * row[iy]``: when ``(height - 1) * scale`` rounds below ``h - 1`` in float32
    (about 5% of input heights; none of VOC's common ones at 416), ``dy`` is nearly 1 and that
    row comes out nearly black. Kept, so that darknet's weights see darknet's pixels.
    """
    out = _bilinear(image, height, width).contiguous()
    in_height = image.shape[-2]
    if in_height > 1 and height > 1:
        scale = np.float32(in_height - 1) / np.float32(height - 1)
        last = np.float32(height - 1) * scale
        row = int(last)
        if row < in_height - 1:
            weight = float(np.float32(1) - (last - np.float32(row)))
            out[..., -1, :] = _bilinear(image[..., row : row + 1, :], 1, width)[..., 0, :] * weight
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation


def letterbox_size(width: int, height: int, size: int) -> tuple[int, int]:
    """darknet's ``letterbox_image`` size rule: the image fits ``size x size`` by its larger
    side; the other side is an integer division. Returns ``(new_width, new_height)`` >= 1."""
    if np.float32(size) / np.float32(width) < np.float32(size) / np.float32(height):
        return size, max(1, height * size // width)
    return max(1, width * size // height), size


def letterbox_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """darknet's ``letterbox_image``: ``[3, h, w]`` float32 -> ``[3, size, size]``.

    The image is resized (``resize_image``) to :func:`letterbox_size` and embedded at
    ``((size - new_w) // 2, (size - new_h) // 2)`` in a canvas of 0.5.
    """
    new_width, new_height = letterbox_size(image.shape[-1], image.shape[-2], size)
    left, top = (size - new_width) // 2, (size - new_height) // 2
    out = torch.full((image.shape[0], size, size), LETTERBOX_FILL, dtype=image.dtype)
    out[:, top : top + new_height, left : left + new_width] = resize_image(
        image, new_height, new_width
    )
    return out


def unletterbox_boxes(boxes: torch.Tensor, width: int, height: int, size: int) -> torch.Tensor:
    """``[..., 4]`` normalised xyxy in a letterboxed ``size x size`` input -> ``[..., 4]``
    normalised xyxy of the ``width x height`` image, not clipped.

    darknet's ``correct_region_boxes`` with letterbox: ``x = (x - (size - new_w) / 2 / size) /
    (new_w / size)``. Its offset is ``(size - new_w) / 2`` unrounded while ``letterbox_image``
    embeds at the integer ``(size - new_w) // 2``: half a network pixel apart when the margin is
    odd; kept, for darknet's numbers.
    """
    new_width, new_height = letterbox_size(width, height, size)
    scale = boxes.new_tensor([new_width, new_height] * 2) / size
    offset = boxes.new_tensor([size - new_width, size - new_height] * 2) / 2.0 / size
    return (boxes - offset) / scale


def unletterbox_detections(detections: torch.Tensor, width: int, height: int, size: int):
    """Detections ``[K, 6]`` of a letterboxed ``size x size`` input -> the same detections with
    boxes normalised to the ``width x height`` image and clipped to it (a copy)."""
    out = detections.clone()
    out[:, :4] = unletterbox_boxes(detections[:, :4], width, height, size).clamp_(0.0, 1.0)
    return out


class EvalTransform:
    """``resize_image`` to ``img_size x img_size`` (darknet's validation) or ``letterbox_image``;
    the target (boxes in the original image) is returned unchanged, as a copy."""

    def __init__(self, img_size: int = 416, *, letterbox: bool = False):
        _check_size(img_size)
        self.img_size, self.letterbox = img_size, letterbox

    def __call__(self, image: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
        pixels = _to_float(_pil_to_hwc(image))
        if self.letterbox:
            return letterbox_image(pixels, self.img_size), dict(target)
        return resize_image(pixels, self.img_size, self.img_size), dict(target)

    def __repr__(self) -> str:
        return f"EvalTransform(img_size={self.img_size}, letterbox={self.letterbox})"


def build_eval_transform(img_size: int = 416, *, letterbox: bool = False) -> EvalTransform:
    """Evaluation preset: darknet's resize, or its letterbox."""
    return EvalTransform(img_size, letterbox=letterbox)


# ---------------------------------------------------------------------------------------------
# Colour


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """darknet's ``rgb_to_hsv``: ``[3, H, W]`` float RGB in [0, 1] -> ``[3, H, W]`` (h, s, v).

    ``v = max``, ``s = (max - min) / max``, hue in sixths from the channel holding the max
    (red, else green, else blue, as darknet tests them): ``(g - b) / delta``, ``2 + (b - r) /
    delta`` or ``4 + (r - g) / delta``, plus 6 if negative, over 6: in [0, 1). Where the pixel
    is grey darknet's hue is 0/0, never used (s = 0); here it is 0. Masks are multiplied in
    rather than selected with ``torch.where``, which is 20-50 times slower on a CPU.
    """
    red, green, blue = image.unbind(0)
    value = image.amax(0)  # [H, W]
    delta = value - image.amin(0)
    is_red = _as_float(red == value)  # darknet tests red first,
    is_green = _as_float(green == value).mul_(1 - is_red)  # then green,
    is_blue = 1 - is_red - is_green  # else blue
    hue = (green - blue).mul_(is_red)  # one of the three terms is not 0
    hue.addcmul_(blue - red, is_green).addcmul_(red - green, is_blue)
    hue.div_(delta.clamp(min=_TINY)).add_(is_green, alpha=2).add_(is_blue, alpha=4)  # grey: 0
    hue.add_(_as_float(hue < 0), alpha=6).div_(6)
    saturation = delta.div_(value.clamp(min=_TINY))  # black: 0 / tiny
    return torch.stack([hue, saturation, value])  # [3, H, W]


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """darknet's ``hsv_to_rgb``: ``[3, H, W]`` (h, s, v) -> ``[3, H, W]`` RGB, not clamped.

    darknet: ``f`` = the fraction of ``6 h`` in its sector, ``p = v (1 - s)``, ``q = v (1 - s
    f)``, ``t = v (1 - s (1 - f))``, and sectors 0..5 give (r, g, b) = (v, t, p), (q, v, p),
    (p, v, t), (p, q, v), (t, p, v), (v, p, q). Each channel is therefore ``v - v s w`` with a
    weight ``w`` in [0, 1] that is piecewise linear in ``6 h`` (0 for v, f or 1 - f for q or t,
    1 for p), which is computed here: equal up to float32 rounding. ``h`` in [0, 1]; at ``h = 1``
    exactly (which darknet's hue shift can produce) its sector 6 falls to the last case with
    ``f = 0``, (v, p, v), not (v, p, p) as at ``h = 0``: kept.
    """
    hue, saturation, value = hsv.unbind(0)
    h6 = hue * 6
    weights = torch.stack([2 - (h6 - 3).abs(), (h6 - 2).abs() - 1, (h6 - 4).abs() - 1])
    weights.clamp_(0, 1)  # [3, H, W], for r, g, b
    weights[2].mul_(_as_float(h6 < 6))  # darknet's sector 6
    return weights.mul_(value * saturation).neg_().add_(value)  # v - v s w


def distort_hsv(
    image: torch.Tensor, hue_shift: float, sat_scale: float, val_scale: float
) -> torch.Tensor:
    """darknet's ``distort_image`` on ``[3, H, W]`` float RGB in [0, 1] -> a new tensor, same.

    To HSV, ``s *= sat_scale``, ``v *= val_scale``, ``h += hue_shift`` brought back into [0, 1]
    by one subtraction or addition of 1 (as darknet), to RGB, clamped to [0, 1]. Saturation
    above 1 is not clamped before the conversion back, as in darknet.
    """
    hsv = rgb_to_hsv(image)  # [3, H, W]
    hue = hsv[0].add_(hue_shift)
    hue.sub_(_as_float(hue > 1))  # one step back into [0, 1], as darknet (1 stays 1)
    hue.add_(_as_float(hue < 0))
    hsv[1].mul_(sat_scale)
    hsv[2].mul_(val_scale)
    return hsv_to_rgb(hsv).clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class DarknetParams:
    """One draw of darknet's augmentation for one image (pixel offsets in the source image)."""

    pleft: int
    pright: int
    ptop: int
    pbot: int
    flip: bool
    hue: float
    saturation: float
    exposure: float


def _rand_scale(uniform: float, coin: float, scale: float) -> float:
    """darknet's ``rand_scale``: ``U(1, s)``, inverted when the coin says so."""
    value = 1.0 + (scale - 1.0) * uniform
    return value if coin < 0.5 else 1.0 / value


def sample_darknet_params(
    width: int,
    height: int,
    *,
    jitter: float,
    hue: float,
    saturation: float,
    exposure: float,
    flip_p: float,
) -> DarknetParams:
    """Draw darknet's augmentation parameters from torch's global generator (10 numbers)."""
    u = torch.rand(10, dtype=torch.float64).tolist()
    dw, dh = int(width * jitter), int(height * jitter)
    # int() truncates towards zero, as darknet's float-to-int conversion does
    return DarknetParams(
        pleft=int(-dw + 2 * dw * u[0]),
        pright=int(-dw + 2 * dw * u[1]),
        ptop=int(-dh + 2 * dh * u[2]),
        pbot=int(-dh + 2 * dh * u[3]),
        flip=u[4] < flip_p,
        hue=-hue + 2 * hue * u[5],
        saturation=_rand_scale(u[6], u[7], saturation),
        exposure=_rand_scale(u[8], u[9], exposure),
    )


def _crop_clamped(pixels: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    """darknet's ``crop_image``: ``[h, w, 3]`` -> ``[height, width, 3]`` from ``(left, top)``,
    coordinates outside the image clamped to its edge (edge padding). The window must overlap
    the image (jitter < 0.5 makes sure)."""
    h, w = pixels.shape[:2]
    inside = pixels[max(top, 0) : min(top + height, h), max(left, 0) : min(left + width, w)]
    rows = (max(-top, 0), max(top + height - h, 0))
    cols = (max(-left, 0), max(left + width - w, 0))
    return np.pad(inside, (rows, cols, (0, 0)), mode="edge")


class DarknetTrainTransform:
    """darknet's training augmentation (see the module docstring); picklable for workers."""

    def __init__(
        self,
        img_size: int = 416,
        *,
        jitter: float = AUG.jitter,
        hue: float = AUG.hue,
        saturation: float = AUG.saturation,
        exposure: float = AUG.exposure,
        flip_p: float = AUG.flip,
        min_box_size: float = 0.001,
    ):
        _check_size(img_size)
        if not 0.0 <= jitter < 0.5:
            raise ValueError(f"jitter must be in [0, 0.5) so the crop window stays, got {jitter}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (a fraction of the circle), got {hue}")
        for name, value in (("saturation", saturation), ("exposure", exposure)):
            if value < 1.0:
                raise ValueError(f"{name} must be >= 1 (1/{name} is the other bound), got {value}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability, got {flip_p}")
        self.img_size = img_size
        self.jitter, self.hue, self.saturation, self.exposure = jitter, hue, saturation, exposure
        self.flip_p, self.min_box_size = flip_p, min_box_size

    def __call__(self, image: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
        return self.apply(image, target, self.draw_params(*image.size))

    def draw_params(self, width: int, height: int) -> DarknetParams:
        """The parameters ``__call__`` draws for a ``width x height`` image, not applied."""
        return sample_darknet_params(
            width,
            height,
            jitter=self.jitter,
            hue=self.hue,
            saturation=self.saturation,
            exposure=self.exposure,
            flip_p=self.flip_p,
        )

    def apply(
        self, image: Image.Image, target: dict, params: DarknetParams
    ) -> tuple[torch.Tensor, dict]:
        """The augmentation with given parameters (deterministic): crop, resize, flip, HSV."""
        width, height = image.size
        window_w = width - params.pleft - params.pright
        window_h = height - params.ptop - params.pbot
        window = _crop_clamped(_pil_to_hwc(image), params.pleft, params.ptop, window_w, window_h)
        sized = resize_image(_to_float(window), self.img_size, self.img_size)
        if params.flip:
            sized = sized.flip(-1)
        out = distort_hsv(sized, params.hue, params.saturation, params.exposure)
        return out, self.map_target(target, params, width, height)

    def map_target(self, target: dict, params: DarknetParams, width: int, height: int) -> dict:
        """darknet's ``correct_boxes``: source box -> window, flip, clip, drop the tiny ones."""
        boxes = target["boxes"].to(torch.float64)  # [G, 4] normalised xyxy of the source
        window_w = width - params.pleft - params.pright
        window_h = height - params.ptop - params.pbot
        xs = (boxes[:, 0::2] * width - params.pleft) / window_w  # [G, 2] (x1, x2)
        ys = (boxes[:, 1::2] * height - params.ptop) / window_h  # [G, 2] (y1, y2)
        if params.flip:
            xs = 1.0 - xs.flip(-1)
        mapped = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=-1).clamp_(0.0, 1.0)
        mapped = mapped.to(torch.float32)  # [G, 4]
        keep = ((mapped[:, 2:] - mapped[:, :2]) >= self.min_box_size).all(dim=-1)
        out = dict(target)
        out["boxes"] = mapped[keep].contiguous()
        out["labels"] = target["labels"][keep]
        out["difficult"] = target["difficult"][keep]
        return out

    def __repr__(self) -> str:
        return (
            f"DarknetTrainTransform(img_size={self.img_size}, jitter={self.jitter}, "
            f"hue={self.hue}, saturation={self.saturation}, exposure={self.exposure}, "
            f"flip_p={self.flip_p}, min_box_size={self.min_box_size})"
        )


def build_train_transform(
    img_size: int = 416,
    *,
    jitter: float = AUG.jitter,
    hue: float = AUG.hue,
    saturation: float = AUG.saturation,
    exposure: float = AUG.exposure,
    flip_p: float = AUG.flip,
) -> DarknetTrainTransform:
    """Training preset: darknet's jitter crop, resize, flip and HSV distortion (yolov2-voc.cfg
    values by default)."""
    return DarknetTrainTransform(
        img_size, jitter=jitter, hue=hue, saturation=saturation, exposure=exposure, flip_p=flip_p
    )


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 3, H, W]`` float -> ``[N, 3, size, size]``, bilinear with corners aligned and no
    antialiasing, as ``resize_image``. Darknet resizes each crop straight to the current network
    size; two corner-aligned resizes map the same points (the geometry, so the boxes, agree),
    but the pixels of a batch made at ``img_size`` and enlarged are smoother than darknet's.

    For multi-scale training in the loop: boxes are normalised, so targets do not change.
    Returns the input itself when it already has that size.
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)


def apply_seeded(transform, image, target, seed: int | None):
    """``transform(image, target)`` with its random draws from ``seed`` when one is given (a
    dataset item's own seed, so that an item is augmented alike by any worker). Seeds the CPU
    generator alone: ``torch.manual_seed`` also queues lazy CUDA seeding, ~0.5 ms an item."""
    if seed is None:
        return transform(image, target)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(image, target)
