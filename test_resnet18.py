"""Evaluate YOLOv2 (resnet18) weights on VOC2007 test: VOC07/VOC12/COCO mAP, per-class AP,
PR curves, drawn detections and FPS, written to --out.

"""

import sys

from yolo.cli import run
from yolo.config import TestConfig

PRESET = TestConfig(model="resnet18", out="model/test-resnet18")


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.testing:run_test")


if __name__ == "__main__":
    sys.exit(main())
