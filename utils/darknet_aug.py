"""darknet's training augmentation settings (yolov2-voc.cfg): one definition that the transforms
(:mod:`utils.transforms`) and the command-line defaults (:class:`yolo.config.TrainConfig`) both
read. Kept free of torch so that ``--help`` does not import it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Augmentation:
    """jitter: crop offsets up to this fraction of each side; hue: shift up to this fraction of
    the colour circle; saturation, exposure: scale by up to this or its inverse; flip: the
    horizontal flip's probability."""

    jitter: float = 0.3
    hue: float = 0.1
    saturation: float = 1.5
    exposure: float = 1.5
    flip: float = 0.5


DARKNET_AUGMENTATION = Augmentation()

# Where the augmentation runs (--augment-on): per image in the loader workers, batched on the
# training device, or auto (the device on CUDA, else the workers).
AUGMENT_ON = ("auto", "cpu", "device")
