"""Anchors for YOLOv2 by k-means on the shapes of the training boxes (distance 1 - IoU, the
paper's "Dimension Clusters"), on VOC 2007+2012 trainval by default.

Anchors come out in cells of the output grid (32 pixels) at the reference input size
--img-size (416: a 13x13 grid, darknet's cfg numbers), the unit every script uses at any size.
Writes into --out-dir: anchors-K.json for every k (pass it to the other scripts' --anchors; it
holds darknet's cfg line too), clusters-K.png, iou_vs_k.png (several k) and kmeans.json (mean
IoU, anchors in grid cells and as fractions of the image, darknet's cfg line). The paper
reports a mean IoU of 61.0% at k = 5 and 67.2% at k = 9 (Table 1).

Examples: python kmeans.py ; python kmeans.py --k 1-15 ; python kmeans.py --demo --k 2-6
"""

import sys

from yolo.cli import run
from yolo.config import KMeansConfig

PRESET = KMeansConfig()


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.kmeans:find_anchors")


if __name__ == "__main__":
    sys.exit(main())
