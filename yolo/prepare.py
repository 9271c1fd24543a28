"""Getting data ready: the engines of ``download_voc.py`` (Pascal VOC) and ``import_voc.py``
(a labelling tool's images and XML folders into the VOCdevkit layout)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from utils.download import download_voc
from utils.importer import REPORT, import_labelled, report_text

log = logging.getLogger(__name__)

SHOWN_SKIPS = 20


def run_download(config) -> dict:
    """Download, check and extract the VOC tarballs of a :class:`yolo.config.DownloadConfig`."""
    devkit = download_voc(
        config.root,
        items=config.items,
        mirror=config.mirror,
        tarball_dirs=[config.tarballs] if config.tarballs else [],
    )
    log.info("VOC is ready in %s; next: python train_yolov2.py --data-root %s", devkit, devkit)
    return {"devkit": str(devkit)}


def run_import(config) -> dict:
    """Import as an :class:`yolo.config.ImportConfig` says; logs the skips and the command to
    train on the result."""
    if config.missing_flags():
        raise ValueError(f"give {' '.join(config.missing_flags())} (see --help)")
    result = import_labelled(
        config.images, config.annotations, config.out,
        val=config.val, seed=config.seed, link=config.link,
    )  # fmt: skip
    for file, reason in result.skipped[:SHOWN_SKIPS]:
        log.warning("skipped %s: %s", file, reason)
    summary = report_text(result).splitlines()[:2]
    log.info("imported into %s: %s; %s (all in %s)", config.out, *summary, REPORT)
    command = train_command(config.out, result.name)
    log.info(
        "next, train on a GPU from darknet's VOC model (downloaded once):\n%s --weights "
        "yolov2-voc\nor on a CPU, a small model from scratch (docs/own-data.md):"
        "\n%s --preset small",
        command, command,
    )  # fmt: skip
    return {"name": result.name, "classes": list(result.classes)}


def train_command(out: str, name: str) -> str:
    """The training command for an imported set: its ``VOC<NAME>`` folder holds the splits, and
    ``classes.txt`` beside it the classes (the presets give the rest)."""
    return (
        f"python train_yolov2.py --data {shlex.quote(str(Path(out) / f'VOC{name}'))} --run {name}"
    )
