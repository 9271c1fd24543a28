"""Train YOLOv2 with an ImageNet-pretrained ResNet18 backbone and a passthrough on VOC.

Darknet's schedule (lr 1e-3, burn-in, /10 at epochs 60 and 90, effective batch 64,
multi-scale 320..608); evaluated at 544. ``--pretrained PATH`` takes a local
copy of torchvision's ImageNet weights, ``--no-pretrained`` trains the backbone from scratch.
"""

import sys

from yolo.cli import run
from yolo.config import TrainConfig

PRESET = TrainConfig(
    model="resnet18", run="yolov2-resnet18", pretrained="default", eval_img_size=544
)


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.train:fit", prepare="yolo.checkpoint:resume_settings")


if __name__ == "__main__":
    sys.exit(main())
