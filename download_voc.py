"""Download Pascal VOC 2007 + 2012 (three tarballs, md5-checked, resumable) and extract them into
ROOT/VOCdevkit, the training scripts' default --data-root (data/VOCdevkit).

Tarballs already in ROOT or in --tarballs DIR are used as they are; offline, the error lists
each missing tarball, its URL and where to put it.

Examples: python download_voc.py ; python download_voc.py --items 2007-test ;
python download_voc.py --mirror https://my.mirror/voc ; python download_voc.py --tarballs DIR
"""

import sys

from yolo.cli import run
from yolo.config import DownloadConfig

PRESET = DownloadConfig()


def main(argv: list[str] | None = None) -> int:
    return run(PRESET, argv, __doc__, "yolo.prepare:run_download")


if __name__ == "__main__":
    sys.exit(main())
