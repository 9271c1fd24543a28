"""Detect objects in images, folders, a video file or a webcam with a checkpoint of this project
or darknet's yolov2-voc.weights. Writes annotated copies (images keep their stem; a video or
webcam gives an mp4 at the source's fps and size) and detections.json (boxes in the original
pixels and normalised) into --out. A webcam runs until q/Esc in the --show window, Ctrl-C or
--max-frames.

Examples: python detect.py --weights model/yolov2/best.pt --source photos/ ;
python detect.py --weights yolov2-voc.weights --source clip.mp4 ;
python detect.py --weights model/yolov2/best.pt --source 0 --show
"""

import logging
import sys

from yolo.cli import USER_ERRORS, setup_logging
from yolo.config import parse_config
from yolo.detect import DetectConfig, run_detect

PRESET = DetectConfig(model="darknet19", img_size=416, conf_threshold=0.25, out="model/detect")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(PRESET, argv, __doc__)
    setup_logging()
    try:
        run_detect(config)
    except (*USER_ERRORS, ImportError) as error:
        logging.getLogger("detect").error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
