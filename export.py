"""Export a checkpoint of this project or darknet's yolov2-voc.weights to ONNX.

With --decode (the default) the graph outputs boxes [N, P, 4] (xyxy normalised to [0, 1], not
clipped) and scores [N, P, C] (objectness * class probability); with --no-decode the raw head
[N, A*(5+C), H/32, W/32]. Input: images [N, 3, H, W] float32 RGB in [0, 1]. Class names and
anchors are stored in the model's metadata_props. With --check (the default) onnxruntime's
outputs are compared with PyTorch's before the file is written. Needs: pip install onnx
onnxruntime (and onnxscript for --exporter dynamo).

Examples: python export.py --weights model/yolov2-darknet19/best.pt ;
python export.py --weights yolov2-voc --out model/export/yolov2-voc.onnx --dynamic-size ;
python export.py --weights model/yolov2-darknet19/best.pt --no-decode --img-size 608
"""

import sys

from yolo.cli import run
from yolo.config import ExportConfig

PRESET = ExportConfig(model="darknet19", out="model/export/yolov2.onnx")


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.export:run_export")


if __name__ == "__main__":
    sys.exit(main())
