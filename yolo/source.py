"""What ``detect.py --source`` names: image files and folders, one video file, or a webcam."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from utils.images import IMAGE_SUFFIXES as DATASET_SUFFIXES

IMAGE_SUFFIXES = (*DATASET_SUFFIXES, ".tif", ".tiff", ".webp")  # what a folder may hold
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


@dataclass(frozen=True)
class Source:
    """What ``--source`` names: ``kind`` is "images", "video" or "webcam"."""

    kind: str
    paths: tuple[Path, ...] = ()
    webcam: int | None = None


def resolve_source(items: Sequence[str]) -> Source:
    """Classify ``--source``: a webcam index, one video file, or image files and folders.

    A folder contributes its files with an image suffix (sorted, not recursive).
    """
    if len(items) == 1 and items[0].isdigit():
        return Source("webcam", webcam=int(items[0]))
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"--source {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--source {path}: no such file or folder")
    videos = [p for p in paths if p.suffix.lower() in VIDEO_SUFFIXES]
    if videos and len(paths) > 1:
        raise ValueError(f"--source: give one video file on its own, got {len(paths)} inputs")
    return Source("video", paths=tuple(paths)) if videos else Source("images", paths=tuple(paths))
