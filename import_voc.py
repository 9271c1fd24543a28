"""Import a labelling tool's output (a folder of images and a folder of VOC XML, as LabelImg or
CVAT write them) into the VOCdevkit layout the training scripts read: a seeded train/val split,
a classes file of the names found, and a report of what was skipped and why. The images are
copied (or symlinked with --link), the XML copied byte for byte; nothing of yours is moved or
edited. It ends with the command to train on the result.

Example: python import_voc.py --images raccoon/images --annotations raccoon/annotations
--out data/raccoon
"""

import logging
import shlex
import sys
from pathlib import Path

from utils.importer import REPORT, import_labelled, report_text
from yolo.cli import USER_ERRORS, setup_logging
from yolo.config import ImportConfig, parse_config

PRESET = ImportConfig()
SHOWN_SKIPS = 20


def train_command(out: str, name: str) -> str:
    """The training command for the imported set."""
    classes = str(Path(out) / "classes.txt")
    return (
        f"python train_yolov2.py --data-root {shlex.quote(out)} --classes {shlex.quote(classes)} "
        f"--train-sets {name}:train --val-set {name}:val --run {name}"
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(PRESET, argv, __doc__)
    setup_logging()
    log = logging.getLogger("import_voc")
    if config.missing_flags():
        log.error("give %s (see --help)", " ".join(config.missing_flags()))
        return 1
    try:
        result = import_labelled(
            config.images,
            config.annotations,
            config.out,
            val=config.val,
            seed=config.seed,
            link=config.link,
        )
    except (*USER_ERRORS, OSError) as error:
        log.error("%s", error)
        return 1
    for file, reason in result.skipped[:SHOWN_SKIPS]:
        log.warning("skipped %s: %s", file, reason)
    summary = report_text(result).splitlines()[:2]
    log.info("imported into %s: %s; %s (all in %s)", config.out, *summary, REPORT)
    log.info("next, train:\n%s", train_command(config.out, result.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
