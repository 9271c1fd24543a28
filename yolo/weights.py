"""Named pretrained weights: darknet's published ``.weights`` files, downloaded on first use.

``resolve_weights(name_or_path)`` turns what a user gives as ``--weights`` into a file and what
building its model needs, as a frozen ``ResolvedWeights``:

- a path to an existing file: ``ResolvedWeights(path)``, every other field None (a file says
  nothing about its model, classes or anchors, so the caller's own settings apply);
- a name in ``DARKNET_RELEASES`` (``yolov2-voc``, ``yolov2-tiny-voc``, ``yolov2``,
  ``darknet19_448.conv.23``): the file in the torch hub cache,
  ``<torch.hub.get_dir()>/checkpoints/<file name>``, downloaded there when missing, with
  ``name``, ``model`` (a ``build_model`` name), ``classes`` (names in the file's output order),
  ``anchors`` (float32 ``[A, 2]`` (w, h) in grid cells: the cfg's ``anchors=`` numbers) and
  ``img_size`` (the cfg's input size). The backbone prefix ``darknet19_448.conv.23`` has no
  classes, anchors or size: those fields are None;
- anything else: a one-line FileNotFoundError listing the known names.

A cached file is checked on every call: its size must be exactly the release's and it must
start with a darknet header. A download goes to a temp file in the cache folder and is renamed
into place only once it passes the same check (and the sha256, for a release that has one), so
a truncated download or an error page never reaches the cache: a failed download is deleted.
A wrong file already at the cache path is kept, because it may be one the user put there by
hand; the error names it and says to delete or replace it. ``YOLO_WEIGHTS_URL`` (a base URL;
the file name is appended; ``file://`` works) replaces darknet's base URL, for mirrors and
offline sites. When the download fails (offline), a one-line ConnectionError names the URL and
the cache path to put the file in.
"""

import http.client
import logging
import os
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from utils.anchors import DARKNET_VOC_ANCHORS_GRID
from utils.data import VOC_CLASSES
from utils.fileio import atomic_path
from yolo.darknet import read_header

__all__ = [
    "DARKNET_BASE_URL",
    "DARKNET_COCO_CLASSES",
    "DARKNET_RELEASES",
    "MIRROR_ENV",
    "DarknetRelease",
    "ResolvedWeights",
    "release_url",
    "resolve_weights",
    "weights_cache_path",
]

logger = logging.getLogger(__name__)

DARKNET_BASE_URL = "https://pjreddie.com/media/files/"
MIRROR_ENV = "YOLO_WEIGHTS_URL"
# What urllib raises when a server cannot be reached or stops mid-file; other OSErrors (a full
# disk, an unwritable cache) are not "offline" and keep their own message.
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)

# darknet's data/coco.names: the output order of yolov2.weights, with darknet's VOC spellings
# (motorbike, aeroplane, sofa, pottedplant, diningtable, tvmonitor) of COCO's category names.
DARKNET_COCO_CLASSES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@dataclass(frozen=True)
class DarknetRelease:
    """One of darknet's published ``.weights`` files and what building its model needs.

    ``num_bytes`` is the exact file size: a 16-byte header (version 0.1) and the float32
    payload of ``model``'s conv layers (the first 18 for a backbone prefix). ``anchors`` are
    (w, h) pairs in grid cells, the cfg's ``anchors=`` numbers. ``classes``, ``anchors`` and
    ``img_size`` are None for a backbone prefix. ``sha256`` only where a published one is known.
    """

    url: str
    model: str
    num_bytes: int
    classes: tuple[str, ...] | None = None
    anchors: tuple[tuple[float, float], ...] | None = None
    img_size: int | None = None
    sha256: str | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# darknet's [region] anchors= of cfg/yolov2-voc.cfg, yolov2-tiny-voc.cfg and yolov2.cfg:
# (w, h) in cells of the stride-32 grid.
YOLOV2_TINY_VOC_ANCHORS = ((1.08, 1.19), (3.42, 4.41), (6.63, 11.38), (9.42, 5.11), (16.62, 10.52))
YOLOV2_COCO_ANCHORS = (
    (0.57273, 0.677385), (1.87446, 2.06253), (3.33843, 5.47434), (7.88282, 3.52778),
    (9.77052, 9.16828),
)  # fmt: skip

# Sizes: darknet_weights_nbytes of the model each names; classes, anchors and input sizes: the
# cfgs (all checked against darknet's cfg files in tests/test_weights.py).
DARKNET_RELEASES: Mapping[str, DarknetRelease] = MappingProxyType(
    {
        "yolov2-voc": DarknetRelease(
            url=DARKNET_BASE_URL + "yolov2-voc.weights",
            model="darknet19",
            num_bytes=202_704_260,
            classes=VOC_CLASSES,
            anchors=DARKNET_VOC_ANCHORS_GRID,
            img_size=416,
        ),
        "yolov2-tiny-voc": DarknetRelease(
            url=DARKNET_BASE_URL + "yolov2-tiny-voc.weights",
            model="tiny",
            num_bytes=63_471_556,
            classes=VOC_CLASSES,
            anchors=YOLOV2_TINY_VOC_ANCHORS,
            img_size=416,
        ),
        "yolov2": DarknetRelease(
            url=DARKNET_BASE_URL + "yolov2.weights",
            model="darknet19",
            num_bytes=203_934_260,
            classes=DARKNET_COCO_CLASSES,
            anchors=YOLOV2_COCO_ANCHORS,
            img_size=608,
        ),
        "darknet19_448.conv.23": DarknetRelease(
            url=DARKNET_BASE_URL + "darknet19_448.conv.23",
            model="darknet19",
            num_bytes=79_327_120,
        ),
    }
)


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file and, for a named release, what building its model needs.

    ``anchors``: float32 ``[A, 2]`` (w, h) in grid cells, a new tensor per call. Fields other
    than ``path`` are None where the source does not say (a plain path; a backbone prefix).
    """

    path: Path
    name: str | None = None
    model: str | None = None
    classes: tuple[str, ...] | None = None
    anchors: torch.Tensor | None = field(default=None, compare=False)
    img_size: int | None = None


def weights_cache_path(release: DarknetRelease) -> Path:
    """Where ``release`` is cached: ``<torch.hub.get_dir()>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / release.file_name


def release_url(release: DarknetRelease, base_url: str | None = None) -> str:
    """``release``'s URL, on ``base_url`` (else ``$YOLO_WEIGHTS_URL``) when one is given."""
    base = base_url or os.environ.get(MIRROR_ENV)
    if not base:
        return release.url
    return f"{base.rstrip('/')}/{release.file_name}"


def check_weights_file(path: Path, release: DarknetRelease, *, origin: str, fate: str) -> None:
    """Refuse a file of the wrong size or without a darknet header (``origin`` names it)."""
    found = path.stat().st_size
    if found != release.num_bytes:
        raise ValueError(
            f"{origin}: {found:,} bytes, expected {release.num_bytes:,} for darknet's "
            f"{release.file_name}; {fate}"
        )
    try:
        read_header(path)
    except ValueError as err:
        reason = str(err).removeprefix(f"{path}: ")
        raise ValueError(f"{origin}: {reason}; {fate}") from err


def download_release(
    release: DarknetRelease, url: str, cached: Path, *, progress: bool = True
) -> None:
    """Download ``url`` to a temp file beside ``cached``; rename it there once it checks out."""
    logger.info("downloading %s (%s bytes) to %s", url, f"{release.num_bytes:,}", cached)
    deleted = f"deleted the download, nothing cached at {cached}"
    with atomic_path(cached) as tmp:
        try:
            torch.hub.download_url_to_file(
                url, os.fspath(tmp), hash_prefix=release.sha256, progress=progress
            )
        except NETWORK_ERRORS as err:
            # "HTTP Error 404: ..." says more than HTTPError's reason; URLError's str wraps it.
            http_error = isinstance(err, urllib.error.HTTPError)
            reason = err if http_error else getattr(err, "reason", err)
            raise ConnectionError(
                f"could not download {url} ({reason}). Offline, put darknet's "
                f"{release.file_name} ({release.num_bytes:,} bytes) at {cached}, or set "
                f"{MIRROR_ENV} to a mirror's base URL"
            ) from err
        except RuntimeError as err:  # torch.hub's sha256 check
            raise ValueError(f"{url}: {err}; {deleted}") from err
        check_weights_file(tmp, release, origin=url, fate=deleted)
    logger.info("saved %s", cached)


def resolve_weights(
    name_or_path: str | os.PathLike,
    *,
    releases: Mapping[str, DarknetRelease] = DARKNET_RELEASES,
    base_url: str | None = None,
    progress: bool = True,
) -> ResolvedWeights:
    """A weights file from a path or a release name (downloaded into the hub cache once).

    Args:
        name_or_path: a path to an existing file (returned as is), or a key of ``releases``.
        base_url: a mirror replacing darknet's base URL; default ``$YOLO_WEIGHTS_URL``.
    Raises:
        FileNotFoundError: neither a file nor a known name (the message lists the names).
        ValueError: a file of the wrong size or header (downloads are deleted, cached kept).
        ConnectionError: the download failed; the message names the URL and the cache path.
    """
    path = Path(name_or_path)
    if path.is_file():
        return ResolvedWeights(path)
    name = os.fspath(name_or_path)
    release = releases.get(name)
    if release is None:
        by_file = [key for key, known in releases.items() if known.file_name == path.name]
        hint = f" (for darknet's {path.name}, give the name {by_file[0]!r})" if by_file else ""
        raise FileNotFoundError(
            f"weights {name!r} are neither a file nor a known name{hint}; known names: "
            f"{', '.join(releases)}"
        )
    cached = weights_cache_path(release)
    if cached.is_file():
        kept = "kept it: delete it to download again, or replace it with darknet's file"
        check_weights_file(cached, release, origin=os.fspath(cached), fate=kept)
    else:
        download_release(release, release_url(release, base_url), cached, progress=progress)
    anchors = (
        None if release.anchors is None else torch.tensor(release.anchors, dtype=torch.float32)
    )
    return ResolvedWeights(
        path=cached,
        name=name,
        model=release.model,
        classes=release.classes,
        anchors=anchors,  # [A, 2] float32, grid cells
        img_size=release.img_size,
    )
