"""Import a labelling tool's output (a folder of images and a folder of VOC XML, as LabelImg or
CVAT write them, a folder of YOLO-txt labels with its classes.txt, or a COCO instances .json)
into the VOCdevkit layout the training scripts read: a seeded train/val split, a classes file
of the names found, and a report of what was skipped and why. The images are copied (or
symlinked with --link), the XML copied byte for byte (YOLO-txt and COCO boxes are written as
VOC XML); nothing of yours is moved or edited. It ends with the command to train on the result.

Example: python import_voc.py --images raccoon/images --annotations raccoon/annotations
--out data/raccoon
"""

import sys

from yolo.cli import run
from yolo.config import ImportConfig

PRESET = ImportConfig()


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.prepare:run_import")


if __name__ == "__main__":
    sys.exit(main())
