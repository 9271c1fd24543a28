"""Joint (image, target) transforms: darknet's training augmentation and the evaluation resize.

A transform takes a PIL RGB image and a target dict (``"boxes"`` ``[G, 4]`` float32 normalised
xyxy, ``"labels"`` ``[G]`` int64, ``"difficult"`` ``[G]`` bool, plus any other keys, which pass
through) and returns a float32 tensor ``[3, S, S]`` RGB in [0, 1] and a new target dict whose
boxes are normalised xyxy relative to the output image.

The training preset follows darknet's ``load_data_detection`` (yolov2 era, ``src/data.c``) and
``random_distort_image`` (``src/image.c``):

- jitter crop: with ``dw = int(jitter * w)`` and ``dh = int(jitter * h)``, four integer offsets
  ``pleft, pright ~ U(-dw, dw)`` and ``ptop, pbot ~ U(-dh, dh)`` (truncated towards zero) cut
  the window ``[pleft, w - pright) x [ptop, h - pbot)``; parts of the window outside the image
  repeat the nearest edge pixel (darknet's ``crop_image`` clamps its coordinates); the window is
  resized to ``S x S``, so aspect ratio and scale change;
- horizontal flip with probability ``flip_p`` (darknet: 0.5);
- HSV distortion: hue shifted by ``U(-hue, hue)`` of the full circle, saturation and value
  multiplied by ``rand_scale(saturation)`` and ``rand_scale(exposure)``, where ``rand_scale(s)``
  draws ``U(1, s)`` and inverts it with probability 0.5; saturation is not clamped before the
  conversion back to RGB and the result is clamped to [0, 1], as darknet does;
- boxes are mapped with the image, clipped to [0, 1] and dropped when narrower or lower than
  ``min_box_size`` (darknet's ``fill_truth_detection`` drops ``w < .001 or h < .001``).

Two choices differ from darknet's code and are documented where they are made: the window is
resized with antialiased bilinear interpolation (torchvision's uint8 kernel, darknet resizes
without antialiasing), and the edge padding is laid out on whole output pixels, the boxes being
mapped with that exact layout (a shift of at most half an output pixel from darknet's window).
Every random number comes from torch's global generator, so a caller that seeds it (the dataset
does, per item) gets reproducible augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "MULTISCALE_SIZES",
    "DarknetParams",
    "DarknetTrainTransform",
    "EvalTransform",
    "build_eval_transform",
    "build_train_transform",
    "distort_hsv",
    "resize_batch",
    "sample_darknet_params",
]

MULTISCALE_SIZES = tuple(range(320, 609, 32))
_TINY = torch.finfo(torch.float32).tiny


def _check_size(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size <= 0 or img_size % 32:
        raise ValueError(f"img_size must be a positive multiple of 32, got {img_size!r}")


def _pil_to_hwc(image: Image.Image) -> np.ndarray:
    """PIL RGB image -> ``[H, W, 3]`` uint8 array (a writable copy)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return np.array(image)


def _resize_hwc(array: np.ndarray, height: int, width: int) -> torch.Tensor:
    """``[h, w, 3]`` uint8 -> ``[3, height, width]`` uint8, antialiased bilinear.

    The tensor keeps channels-last strides, which is what torchvision's fast uint8 kernel
    wants (several times faster than PIL's resize).
    """
    chw = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # [3, h, w] view
    return TF.resize(chw, [height, width], antialias=True)


def _to_float(image_u8: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` uint8 (any strides) -> contiguous float32 in [0, 1]."""
    return image_u8.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _select(target: dict, keep: torch.Tensor, boxes: torch.Tensor) -> dict:
    out = dict(target)
    out["boxes"] = boxes[keep].contiguous()
    out["labels"] = target["labels"][keep]
    out["difficult"] = target["difficult"][keep]
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation


class EvalTransform:
    """Resize to ``img_size x img_size`` (no letterbox, as darknet validates); boxes unchanged."""

    def __init__(self, img_size: int = 416):
        _check_size(img_size)
        self.img_size = img_size

    def __call__(self, image: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
        resized = _resize_hwc(_pil_to_hwc(image), self.img_size, self.img_size)
        return _to_float(resized), dict(target)

    def __repr__(self) -> str:
        return f"EvalTransform(img_size={self.img_size})"


def build_eval_transform(img_size: int = 416) -> EvalTransform:
    """Evaluation preset: resize only."""
    return EvalTransform(img_size)


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


@dataclass(frozen=True)
class _Axis:
    """Where the in-image part of the crop window lands on one output axis.

    Source pixels ``[src0, src1)`` are resized onto output pixels ``[out0, out1)``; the output
    before ``out0`` and from ``out1`` on repeats the edge pixels.
    """

    src0: int
    src1: int
    out0: int
    out1: int

    def map(self, coords_px: torch.Tensor) -> torch.Tensor:
        """Source pixel coordinates -> output pixel coordinates (any shape)."""
        scale = (self.out1 - self.out0) / (self.src1 - self.src0)
        return (coords_px - self.src0) * scale + self.out0


def _layout_axis(length: int, cut_start: int, cut_end: int, size: int) -> _Axis:
    """The window ``[cut_start, length - cut_end)`` of a source axis, resized to ``size``."""
    window = length - cut_start - cut_end
    src0, src1 = max(cut_start, 0), min(length - cut_end, length)
    out0 = round((src0 - cut_start) * size / window)
    out1 = round((src1 - cut_start) * size / window)
    out1 = min(max(out1, out0 + 1), size)
    out0 = min(out0, out1 - 1)
    return _Axis(src0, src1, out0, out1)


def distort_hsv(
    image: torch.Tensor, hue_shift: float, sat_scale: float, val_scale: float
) -> torch.Tensor:
    """darknet's ``distort_image`` on ``[3, H, W]`` float RGB in [0, 1] -> same, clamped.

    In HSV (hue in [0, 1) of the full circle): ``h += hue_shift`` modulo 1, ``s *= sat_scale``,
    ``v *= val_scale``, back to RGB, clamp. Computed without leaving RGB, with arithmetic ops
    only (several times faster than an HSV round trip, exact to float32): with ``v = max``,
    ``delta = max - min`` and ``w_c = (v - c) / delta`` per channel, the hue in sixths is
    ``1 + w_r - w_g`` where blue is the minimum, ``3 + w_g - w_b`` where red is and
    ``5 + w_b - w_r`` where green is; after the shift, darknet's hsv_to_rgb gives each channel
    ``v' - chroma' * w'_c`` with ``chroma' = s' v'`` and, for the shifted hue ``u`` in [0, 6),
    ``w'_r = clamp(2 - |u - 3|)``, ``w'_g = clamp(|u - 2| - 1)``, ``w'_b = clamp(|u - 4| - 1)``
    (clamped to [0, 1]). Saturation above 1 is not clamped before that, as in darknet.
    The input is not modified.
    """
    value = image.amax(0)  # [H, W]
    delta = value - image.amin(0)  # [H, W]
    weight = torch.sub(value, image).div_(delta.clamp(min=_TINY))  # [3, H, W]
    out = torch.empty_like(image, memory_format=torch.contiguous_format)
    return _hsv_to_rgb(value, delta, weight, (hue_shift, sat_scale, val_scale), out)


def _distort_hsv_uint8(
    image_u8: torch.Tensor, hue_shift: float, sat_scale: float, val_scale: float, out: torch.Tensor
) -> torch.Tensor:
    """``distort_hsv`` of ``[3, H, W]`` uint8 (any strides) written into float ``out`` [0, 1].

    Never materialises the float image: only max, min and the per-channel weights are needed.
    """
    image_u8 = image_u8.contiguous()  # uint8 ops on channels-last strides are slow
    value_u8 = image_u8.amax(0)  # [H, W]
    delta = (value_u8 - image_u8.amin(0)).to(torch.float32)  # [H, W], no underflow: max >= min
    weight = (value_u8 - image_u8).to(torch.float32).div_(delta.clamp(min=_TINY))  # [3, H, W]
    value = value_u8.to(torch.float32)
    return _hsv_to_rgb(value, delta, weight, (hue_shift, sat_scale, val_scale / 255.0), out)


def _hsv_to_rgb(value, delta, weight, scales, out: torch.Tensor) -> torch.Tensor:
    """The shared core of ``distort_hsv``: ``value``, ``delta`` ``[H, W]``, ``weight``
    ``[3, H, W]`` (``(v - c) / delta``; reused as scratch) -> ``out`` ``[3, H, W]``."""
    hue_shift, sat_scale, val_scale = scales
    w_r, w_g, w_b = weight.unbind(0)
    # 1.0 exactly on the minimum channel, 0.0 elsewhere; ties go to blue, then red, then green
    min_b = w_b.floor()
    min_r = w_r.floor().mul_(1.0 - min_b)
    min_g = (1.0 - min_b).sub_(min_r)
    # hue in sixths, shifted: the sector start (1, 3 or 5) plus the in-sector offset
    hue = min_b.mul(-4.0).add_(5.0 + 6.0 * hue_shift).sub_(min_r, alpha=2.0)  # [H, W]
    hue.addcmul_(w_r - w_g, min_b)
    hue.addcmul_(w_g - w_b, min_r)
    hue.addcmul_(w_b - w_r, min_g)
    hue -= torch.mul(hue, 1.0 / 6.0).floor_().mul_(6.0)  # into [0, 6)
    torch.sub(hue, 3.0, out=w_r).abs_().neg_().add_(2.0)  # the new weights, in place
    torch.sub(hue, 2.0, out=w_g).abs_().sub_(1.0)
    torch.sub(hue, 4.0, out=w_b).abs_().sub_(1.0)
    weight.clamp_(0.0, 1.0)
    chroma = delta.mul_(val_scale * sat_scale)
    torch.addcmul(value.mul_(val_scale), weight, chroma, value=-1.0, out=out)
    return out.clamp_(0.0, 1.0)


def _replicate_edges(image: torch.Tensor, top: int, bottom: int, left: int, right: int) -> None:
    """Fill ``[3, S, S]`` outside rows ``[top, bottom)`` x cols ``[left, right)`` with the
    nearest pixel of that region, in place (as ``F.pad(mode="replicate")``)."""
    image[:, :top, left:right] = image[:, top : top + 1, left:right]
    image[:, bottom:, left:right] = image[:, bottom - 1 : bottom, left:right]
    image[:, :, :left] = image[:, :, left : left + 1]
    image[:, :, right:] = image[:, :, right - 1 : right]


class DarknetTrainTransform:
    """darknet's training augmentation (see the module docstring); picklable for workers."""

    def __init__(
        self,
        img_size: int = 416,
        *,
        jitter: float = 0.3,
        hue: float = 0.1,
        saturation: float = 1.5,
        exposure: float = 1.5,
        flip_p: float = 0.5,
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
        width, height = image.size
        params = sample_darknet_params(
            width,
            height,
            jitter=self.jitter,
            hue=self.hue,
            saturation=self.saturation,
            exposure=self.exposure,
            flip_p=self.flip_p,
        )
        return self.apply(image, target, params)

    def apply(
        self, image: Image.Image, target: dict, params: DarknetParams
    ) -> tuple[torch.Tensor, dict]:
        """The augmentation with given parameters (deterministic)."""
        width, height = image.size
        size = self.img_size
        x_axis = _layout_axis(width, params.pleft, params.pright, size)
        y_axis = _layout_axis(height, params.ptop, params.pbot, size)
        window = _pil_to_hwc(image)[y_axis.src0 : y_axis.src1, x_axis.src0 : x_axis.src1]
        inner = _resize_hwc(window, y_axis.out1 - y_axis.out0, x_axis.out1 - x_axis.out0)
        left, right = x_axis.out0, x_axis.out1
        if params.flip:
            inner = inner.flip(-1)
            left, right = size - right, size - left
        out = torch.empty(3, size, size)
        region = out[:, y_axis.out0 : y_axis.out1, left:right]
        _distort_hsv_uint8(inner, params.hue, params.saturation, params.exposure, out=region)
        _replicate_edges(out, y_axis.out0, y_axis.out1, left, right)
        return out, self._map_target(target, x_axis, y_axis, width, height, params.flip)

    def _map_target(
        self, target: dict, x_axis: _Axis, y_axis: _Axis, width: int, height: int, flip: bool
    ) -> dict:
        boxes = target["boxes"].to(torch.float32)  # [G, 4] normalised xyxy of the source
        size = self.img_size
        xs = x_axis.map(boxes[:, 0::2] * width) / size  # [G, 2] (x1, x2)
        ys = y_axis.map(boxes[:, 1::2] * height) / size  # [G, 2] (y1, y2)
        if flip:
            xs = 1.0 - xs.flip(-1)
        mapped = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=-1).clamp_(0.0, 1.0)
        wh = mapped[:, 2:] - mapped[:, :2]  # [G, 2]
        keep = (wh >= self.min_box_size).all(dim=-1)
        return _select(target, keep, mapped)

    def __repr__(self) -> str:
        return (
            f"DarknetTrainTransform(img_size={self.img_size}, jitter={self.jitter}, "
            f"hue={self.hue}, saturation={self.saturation}, exposure={self.exposure}, "
            f"flip_p={self.flip_p}, min_box_size={self.min_box_size})"
        )


def build_train_transform(
    img_size: int = 416,
    *,
    jitter: float = 0.3,
    hue: float = 0.1,
    saturation: float = 1.5,
    exposure: float = 1.5,
    flip_p: float = 0.5,
) -> DarknetTrainTransform:
    """Training preset: darknet's jitter crop, flip, HSV distortion and resize (yolov2-voc.cfg
    values by default)."""
    return DarknetTrainTransform(
        img_size, jitter=jitter, hue=hue, saturation=saturation, exposure=exposure, flip_p=flip_p
    )


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 3, H, W]`` float -> ``[N, 3, size, size]`` bilinear (no antialias, as darknet).

    For multi-scale training in the loop: boxes are normalised, so targets do not change.
    Returns the input itself when it already has that size.
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
