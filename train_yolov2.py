"""Train YOLOv2 (Darknet-19, darknet's cfg/yolov2-voc.cfg) on PASCAL VOC 2007+2012 trainval.

From scratch by default; from darknet's ImageNet backbone with
``--darknet-weights darknet19_448.conv.23``. Schedule as the paper: 160 epochs, lr 1e-3 with
darknet's burn-in, /10 at epochs 60 and 90, effective batch 64, multi-scale 320..608.
"""

import sys

from yolo.cli import run
from yolo.config import TrainConfig

PRESET = TrainConfig(model="darknet19", run="yolov2-darknet19", eval_img_size=416)


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.train:fit", prepare="yolo.checkpoint:resume_settings")


if __name__ == "__main__":
    sys.exit(main())
