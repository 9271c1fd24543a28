"""Evaluate YOLOv2 (darknet19) weights on VOC2007 test: VOC07/VOC12/COCO mAP, per-class AP,
PR curves, drawn detections and FPS, written to --out.

Also takes darknet's own ``yolov2-voc.weights`` (--weights yolov2-voc.weights).
"""

import sys

from yolo.cli import run_testing
from yolo.config import TestConfig

PRESET = TestConfig(model="darknet19", img_size=416, out="model/test-yolov2")


def main(argv: list[str] | None = None) -> int:
    return run_testing(PRESET, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
