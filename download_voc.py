"""Download Pascal VOC 2007 + 2012 (three tarballs, md5-checked, resumable) and extract them into
ROOT/VOCdevkit, the training scripts' default --data-root (data/VOCdevkit).

Tarballs already in ROOT or in --tarballs DIR are used as they are; offline, the error lists
each missing tarball, its URL and where to put it.

Examples: python download_voc.py ; python download_voc.py --items 2007-test ;
python download_voc.py --mirror https://my.mirror/voc ; python download_voc.py --tarballs DIR
"""

import logging
import sys

from utils.download import DownloadError, download_voc
from yolo.cli import USER_ERRORS, setup_logging
from yolo.config import DownloadConfig, parse_config

PRESET = DownloadConfig()


def main(argv: list[str] | None = None) -> int:
    config = parse_config(PRESET, argv, __doc__)
    setup_logging()
    log = logging.getLogger("download_voc")
    try:
        devkit = download_voc(
            config.root,
            items=config.items,
            mirror=config.mirror,
            tarball_dirs=[config.tarballs] if config.tarballs else [],
        )
    except (*USER_ERRORS, DownloadError, OSError) as error:
        log.error("%s", error)
        return 1
    log.info("VOC is ready in %s; next: python train_yolov2.py --data-root %s", devkit, devkit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
