"""darknet's training augmentation for a whole batch at once, on the training device.

The per-image path (:class:`utils.transforms.DarknetTrainTransform` in the loader workers) does
everything on the CPU. Here the work splits in two:

- in the workers, :class:`DeferredTrainTransform` keeps the decoded image as ``[H, W, 3]``
  uint8, draws the image's :class:`~utils.transforms.DarknetParams` from the seeded stream
  exactly as the per-image transform draws them (same seed, same parameters) and maps the boxes
  with the per-image transform's own ``map_target`` (same boxes, same kept and dropped ones);
  :func:`collate_raw` pads the batch's images to its largest height and width into a
  :class:`RawBatch`;
- on the device, :func:`augment_batch` makes ``[N, 3, S, S]`` at the batch's training size:
  the jitter crop (coordinates outside the image clamped to its edge, as ``crop_image``), the
  corner-aligned bilinear resize (``resize_image``: the same float32 sample positions and
  weights as ``F.interpolate(align_corners=True)``, and darknet's last-row rounding), the flip
  and the HSV distortion (the per-image :func:`~utils.transforms.distort_hsv`, run on the
  batch), equal to the per-image path to float rounding (tests hold them within 1e-5). The
  one exception is darknet's own discontinuity: a pixel whose shifted hue is exactly 1.0 in
  one path and a float step below it in the other takes the other branch of ``hsv_to_rgb``
  (its sector 6), about one value in 5 x 10^7 on photos.

Sampling at the size the step uses means a multi-scale batch is made at its size directly, as
darknet does, where the per-image path makes ``img_size`` and resizes (``resize_batch``).
The workers hand over whole decoded images (uint8, padded to the batch's largest): about a
quarter of the bytes of float ``[3, 416, 416]`` for VOC-sized photos, but far more for photos
much larger than the training size (a 12-megapixel photo is 36 MB), which are better shrunk
once on disk or left to the per-image path. ``--augment-on``: :func:`resolve_augment_on` picks
the path, :func:`train_pipeline` gives the loader's pieces.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from utils.darknet_aug import AUGMENT_ON
from utils.loader import collate_detection, collate_targets
from utils.transforms import DarknetParams, DarknetTrainTransform, distort_hsv

__all__ = [
    "AUGMENT_ON",
    "DeferredTrainTransform",
    "RawBatch",
    "augment_batch",
    "collate_raw",
    "resolve_augment_on",
    "train_pipeline",
]

log = logging.getLogger(__name__)


def resolve_augment_on(choice: str, device: torch.device | str) -> str:
    """``"cpu"`` or ``"device"`` for ``--augment-on`` ``choice`` on ``device``.

    ``auto``: ``device`` on CUDA, where the workers' time per image drops to about a fifth;
    ``cpu`` elsewhere, where the loader workers run the
    per-image path in parallel while the batched path would run in the training process
    (bench/data_throughput.py measures both).
    """
    if choice not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {', '.join(AUGMENT_ON)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "device" if torch.device(device).type == "cuda" else "cpu"


def train_pipeline(transform: DarknetTrainTransform, augment_on: str, device):
    """The training set's transform and the loader's collate for ``--augment-on`` on
    ``device`` -> ``(transform, collate_fn)``: ``(transform, collate_detection)`` for the
    per-image path, ``(DeferredTrainTransform(transform), collate_raw)`` for the device path
    (whose loader yields ``(RawBatch, targets, metas)``: the step calls :func:`augment_batch`).
    """
    if resolve_augment_on(augment_on, device) == "cpu":
        return transform, collate_detection
    if torch.device(device).type != "cuda":
        log.info("augment_on=device on %s: the batch is made in the training process, not in "
                 "parallel workers (bench/data_throughput.py compares)", device)  # fmt: skip
    return DeferredTrainTransform(transform), collate_raw


class DeferredTrainTransform:
    """The worker's part of the device path (picklable): decoded pixels, drawn parameters.

    ``(image, target)`` -> (``[H, W, 3]`` uint8 tensor of the PIL RGB image, the target as
    ``transform`` maps it, plus ``"augment"``: the :class:`DarknetParams` drawn). The draw is
    ``transform.draw_params``, the one ``transform(image, target)`` makes from the same
    generator state. ``img_size`` is ``transform``'s; the device may sample at another size.
    """

    def __init__(self, transform: DarknetTrainTransform):
        if not isinstance(transform, DarknetTrainTransform):
            raise TypeError(f"expected a DarknetTrainTransform, got {type(transform).__name__}")
        self.transform = transform
        self.img_size = transform.img_size

    def __call__(self, image: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
        width, height = image.size
        params = self.transform.draw_params(width, height)
        out = self.transform.map_target(target, params, width, height)
        out["augment"] = params
        return torch.from_numpy(np.asarray(image).copy()), out  # [H, W, 3] uint8

    def __repr__(self) -> str:
        return f"DeferredTrainTransform({self.transform!r})"


@dataclass(frozen=True)
class RawBatch:
    """Decoded images and their drawn parameters, as :func:`collate_raw` makes them.

    ``pixels`` ``[N, Hp, Wp, 3]`` uint8, image ``i`` in ``[:h_i, :w_i]`` (the rest is not
    read); ``sizes`` ``[N, 2]`` int64 ``(h_i, w_i)``; ``crops`` ``[N, 4]`` int64 ``(pleft,
    pright, ptop, pbot)``; ``flips`` ``[N]`` bool; ``colours`` ``[N, 3]`` float64 ``(hue shift,
    saturation scale, exposure scale)``.
    """

    pixels: torch.Tensor
    sizes: torch.Tensor
    crops: torch.Tensor
    flips: torch.Tensor
    colours: torch.Tensor

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def _map(self, fn) -> RawBatch:
        return RawBatch(*(fn(getattr(self, name)) for name in self.__dataclass_fields__))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RawBatch:
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def __getitem__(self, part: slice) -> RawBatch:
        return self._map(lambda tensor: tensor[part])

    def pin_memory(self) -> RawBatch:
        """Called by a DataLoader with ``pin_memory=True``."""
        return self._map(torch.Tensor.pin_memory)


def _padded_pixels(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[H_i, W_i, 3]`` uint8 tensors -> ``[N, Hp, Wp, 3]``, each at the top left. In a worker
    the batch is made in shared memory, as ``default_collate`` does, to save a copy there."""
    shape = (len(images), max(i.shape[0] for i in images), max(i.shape[1] for i in images), 3)
    if get_worker_info() is None:
        out = torch.empty(shape, dtype=torch.uint8)
    else:
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    for row, image in enumerate(images):
        out[row, : image.shape[0], : image.shape[1]] = image
    return out


def collate_raw(batch: Sequence[tuple[torch.Tensor, dict]]):
    """List of :class:`DeferredTrainTransform` outputs -> (RawBatch, targets, metas), targets
    and metas as ``utils.loader.collate_targets`` (the boxes are already the augmented ones)."""
    images = [image for image, _ in batch]
    params: list[DarknetParams] = [target["augment"] for _, target in batch]
    raw = RawBatch(
        pixels=_padded_pixels(images),
        sizes=torch.tensor([image.shape[:2] for image in images], dtype=torch.int64),
        crops=torch.tensor([[p.pleft, p.pright, p.ptop, p.pbot] for p in params]),
        flips=torch.tensor([p.flip for p in params], dtype=torch.bool),
        colours=torch.tensor(
            [[p.hue, p.saturation, p.exposure] for p in params], dtype=torch.float64
        ),
    )
    return (raw, *collate_targets([target for _, target in batch]))


def _scale(window: torch.Tensor, size: int) -> torch.Tensor:
    """``(window - 1) / (size - 1)`` in float32, ``[n]``. Divided by a tensor: CUDA divides by
    a Python number through its reciprocal, which can differ in the last bit, and the last-row
    rounding below depends on that bit."""
    divisor = torch.full_like(window, max(size - 1, 1), dtype=torch.float32)
    return (window - 1).to(torch.float32) / divisor


def _axis(length: torch.Tensor, start: torch.Tensor, stop_cut: torch.Tensor, size: int):
    """Sample positions along one axis for a batch: ``length`` ``[n]`` image sides, the crop
    window ``[start, length - stop_cut)``, ``size`` outputs -> source indices ``i0, i1`` (int64
    ``[n, size]``, clamped into the image: darknet's edge padding) and weights ``w0, w1``
    (float32 ``[n, size]``).

    As ``F.interpolate(align_corners=True)`` on the window: ``x = scale * j`` in float32,
    ``i0 = min(floor(x), window - 1)``, ``w1 = x - i0`` clamped to [0, 1], ``i1 = i0 + 1``
    inside the window. The window's integer offset is added to the indices, not to ``x``, so
    the weights are those of the window, as in the per-image path.
    """
    window = length - start - stop_cut  # [n]
    steps = torch.arange(size, device=length.device, dtype=torch.float32)
    x = _scale(window, size)[:, None] * steps  # [n, size]
    i0 = torch.minimum(x.floor().to(torch.int64), (window - 1)[:, None])
    w1 = (x - i0.to(torch.float32)).clamp_(0.0, 1.0)
    i1 = i0 + (i0 < (window - 1)[:, None]).to(torch.int64)
    top = (length - 1)[:, None]
    i0 = (i0 + start[:, None]).clamp_(min=0).minimum(top)
    i1 = (i1 + start[:, None]).clamp_(min=0).minimum(top)
    return i0, i1, 1.0 - w1, w1


def _last_row_rounding(w1: torch.Tensor, window: torch.Tensor, size: int) -> torch.Tensor:
    """darknet's last row (see ``resize_image``): when ``(size - 1) * scale`` rounds below the
    window's last row, that row gets ``(1 - dy) * row[iy]`` only: ``w1`` ``[n, size]`` with its
    last column zeroed there."""
    if size > 1:
        last = _scale(window, size) * float(size - 1)  # [n], float32 as darknet
        short = last.floor() < (window - 1).to(torch.float32)
        w1[:, -1] = w1[:, -1].masked_fill(short, 0.0)
    return w1


def _sample(raw: RawBatch, size: int) -> torch.Tensor:
    """Crop, resize and flip: ``[n, size, size, 3]`` float32 in [0, 1] (bytes / 255)."""
    n, height, width = raw.pixels.shape[:3]
    heights, widths = raw.sizes.unbind(1)
    pleft, pright, ptop, pbot = raw.crops.unbind(1)
    y0, y1, v0, v1 = _axis(heights, ptop, pbot, size)  # [n, S]
    v1 = _last_row_rounding(v1, heights - ptop - pbot, size)
    x0, x1, u0, u1 = _axis(widths, pleft, pright, size)
    flip = raw.flips[:, None]
    x0, x1, u0, u1 = (torch.where(flip, t.flip(1), t) for t in (x0, x1, u0, u1))
    base = torch.arange(n, device=raw.pixels.device)[:, None] * height  # [n, 1]
    rows0, rows1 = ((base + y) * width for y in (y0, y1))  # [n, S]: flat index of each row
    flat = raw.pixels.reshape(-1, 3)  # [n * Hp * Wp, 3]
    byte = torch.tensor(255.0, device=flat.device)  # a tensor: CUDA divides by it exactly

    def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # [n, S, S, 3]
        return flat[rows[:, :, None] + cols[:, None, :]].to(torch.float32).div_(byte)

    v0, v1 = v0[:, :, None, None], v1[:, :, None, None]  # [n, S, 1, 1]: rows
    u0, u1 = u0[:, None, :, None], u1[:, None, :, None]  # [n, 1, S, 1]: columns
    # F.interpolate's CPU order (channels last): p00 w00 + p01 w01 + p10 w10 + p11 w11 with
    # w00 = h0 * w0 etc., so that the sums round alike
    out = corner(rows0, x0).mul_(v0 * u0).add_(corner(rows0, x1).mul_(v0 * u1))
    out.add_(corner(rows1, x0).mul_(v1 * u0)).add_(corner(rows1, x1).mul_(v1 * u1))
    return out


def augment_batch(raw: RawBatch, size: int, *, chunk: int = 16) -> torch.Tensor:
    """A :class:`RawBatch` -> ``[N, 3, size, size]`` float32 RGB in [0, 1] on its device.

    darknet's crop, resize, flip and HSV distortion of each image with its drawn parameters,
    equal to ``DarknetTrainTransform(size).apply`` to float rounding. ``chunk`` images at a
    time bound the temporary memory (about 60 bytes an output pixel: 350 MB for 16 at 608).
    """
    if size < 1 or chunk < 1:
        raise ValueError(f"size and chunk must be >= 1, got {size}, {chunk}")
    out = torch.empty(len(raw), 3, size, size, device=raw.pixels.device)
    colours = raw.colours.to(torch.float32)  # as a Python float scales a float32 tensor
    for first in range(0, len(raw), chunk):
        part = slice(first, first + chunk)
        rgb = _sample(raw[part], size)  # [n, S, S, 3]
        hue, saturation, exposure = (c[:, None, None] for c in colours[part].unbind(1))
        hsv = distort_hsv(rgb.permute(3, 0, 1, 2), hue, saturation, exposure)  # [3, n, S, S]
        out[part] = hsv.transpose(0, 1)
    return out
