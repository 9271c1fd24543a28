"""Evaluate YOLOv2 (resnet101) weights on VOC2007 test: VOC07/VOC12/COCO mAP, per-class AP,
PR curves, drawn detections and FPS, written to --out.

"""

import sys

from yolo.cli import run_testing
from yolo.config import TestConfig

PRESET = TestConfig(model="resnet101", img_size=544, out="model/test-resnet101")


def main(argv: list[str] | None = None) -> int:
    return run_testing(PRESET, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
