"""Detect objects in images, folders, a video file or a webcam with a checkpoint of this project
or darknet's yolov2-voc.weights. Writes annotated copies (images keep their stem; a video or
webcam gives an mp4 at the source's fps and size) and detections.json (boxes in the original
pixels and normalised) into --out. A webcam runs until q/Esc in the --show window, Ctrl-C or
--max-frames.

Examples: python detect.py --weights model/yolov2-darknet19/best.pt --source photos/ ;
python detect.py --weights yolov2-voc --source clip.mp4 ;
python detect.py --weights model/yolov2-darknet19/best.pt --source 0 --show
"""

import sys

from yolo.cli import run
from yolo.config import DetectConfig

PRESET = DetectConfig(model="darknet19", conf_threshold=0.25, out="model/detect")


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.detect:run_detect")


if __name__ == "__main__":
    sys.exit(main())
