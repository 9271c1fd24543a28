"""Evaluate YOLOv2 (darknet19) weights on VOC2007 test: VOC07/VOC12/COCO mAP, per-class AP,
PR curves, drawn detections and FPS, written to --out.

Also takes darknet's own weights: --weights yolov2-voc (downloaded once) or a .weights file.
"""

import sys

from yolo.cli import run
from yolo.config import TestConfig

PRESET = TestConfig(model="darknet19", out="model/test-yolov2")


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.testing:run_test")


if __name__ == "__main__":
    sys.exit(main())
