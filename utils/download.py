"""Pascal VOC download: the three tarballs, md5-checked, resumable, extracted under ``root``.

``download_voc("data")`` gives ``data/VOCdevkit/VOC2007/...`` and ``data/VOCdevkit/VOC2012/...``
(the tarballs hold a ``VOCdevkit/`` prefix, kept), the layout the training scripts read by
default. For each item, in order:

1. already extracted (its sentinel file exists): nothing to do;
2. a tarball with the right md5 in one of ``tarball_dirs`` or in ``root``: extracted from there;
3. else downloaded from ``mirror`` (``<mirror>/<tarball>``; http, https or file URLs) or the
   official host into ``<root>/<tarball>.part``, continued with an HTTP Range request when a
   partial file is there (a server that ignores the range restarts it), md5-checked, then
   renamed to ``<root>/<tarball>``;
4. extracted: every member is checked before anything is written (no absolute paths, no
   ``..``; links and devices are not extracted), the sentinel is written last, so an interrupted
   extraction is redone on the next run.

Items that could not be obtained are listed in one :class:`DownloadError` at the end: each
tarball, its URL and where to put it. Files not written here are never changed or deleted.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

__all__ = [
    "MIRROR_SCHEMES",
    "VOC_BASE_URL",
    "VOC_TARBALLS",
    "DownloadError",
    "VocTarball",
    "check_mirror",
    "download_voc",
]

log = logging.getLogger(__name__)

VOC_BASE_URL = "http://host.robots.ox.ac.uk/pascal/VOC"
MIRROR_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VocTarball:
    name: str  # file name, the same on every mirror
    folder: str  # folder on the official host
    md5: str
    sentinel: str  # relative to root: its presence means "extracted"


VOC_TARBALLS = {
    "2007-trainval": VocTarball("VOCtrainval_06-Nov-2007.tar", "voc2007",
                                "c52e279531787c972589f7e41ab4ae64",
                                "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt"),
    "2007-test": VocTarball("VOCtest_06-Nov-2007.tar", "voc2007",
                            "b6e924de25625d8de591ea690078ad9f",
                            "VOCdevkit/VOC2007/ImageSets/Main/test.txt"),
    "2012-trainval": VocTarball("VOCtrainval_11-May-2012.tar", "voc2012",
                                "6cd6e144f989b92b3379bac3b3de84fd",
                                "VOCdevkit/VOC2012/ImageSets/Main/trainval.txt"),
}  # fmt: skip


class DownloadError(OSError):
    """Some items could not be obtained; the message lists each file, its URL and where to put
    it."""


class _Missing(Exception):
    """One item failed; the message says why (the caller adds the URL and the place)."""


def check_mirror(mirror: str) -> str:
    """``mirror`` without a trailing slash; ValueError unless it is an http/https/file URL."""
    scheme = mirror.partition("://")[0].lower() if "://" in mirror else ""
    if scheme not in MIRROR_SCHEMES:
        raise ValueError(
            f"--mirror {mirror!r}: give an http://, https:// or file:// URL of a folder holding "
            f"the tarballs (for a local folder, --tarballs DIR also works)"
        )
    return mirror.rstrip("/")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_from(url: str, offset: int):
    """The response for ``url`` from byte ``offset`` and whether the server honoured the range
    (status 206 starting at ``offset``); None when the partial file is already whole (416)."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            return None, True
        raise
    content_range = response.headers.get("Content-Range") or ""
    resumed = bool(offset) and response.status == 206
    return response, resumed and content_range.startswith(f"bytes {offset}-")


def _fetch(url: str, destination: Path, md5: str) -> None:
    """Download ``url`` to ``destination`` through ``<destination>.part`` (resumed when there),
    check the md5, rename. A corrupt result is deleted; an interrupted one is kept."""
    part = destination.with_name(destination.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    response, resumed = _open_from(url, offset)
    if response is not None:
        if offset and not resumed:
            log.info("%s: the server does not resume downloads, starting again", url)
        start = offset if resumed else 0
        total = start + int(response.headers.get("Content-Length") or 0) or None
        bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=destination.name)
        with response, bar, open(part, "ab" if resumed else "wb") as file:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                file.write(chunk)
                bar.update(len(chunk))
    actual = _md5(part)
    if actual != md5:
        part.unlink()
        raise _Missing(f"the download has md5 {actual}, expected {md5} (corrupt, deleted)")
    os.replace(part, destination)


def _members(archive: tarfile.TarFile, tarball: Path, sentinel: str) -> list[tarfile.TarInfo]:
    """The members to write, the sentinel last; ValueError for an unsafe path."""
    members, last, ignored = [], [], 0
    for member in archive.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"{tarball}: refusing the unsafe member {member.name!r}")
        if not (member.isfile() or member.isdir()):
            ignored += 1
        elif str(path) == sentinel:
            last.append(member)
        else:
            members.append(member)
    if ignored:
        log.warning("%s: %d links or special files not extracted", tarball, ignored)
    return members + last


def _extract(tarball: Path, root: Path, sentinel: str) -> None:
    """Extract regular files and folders of ``tarball`` under ``root``, the sentinel last."""
    log.info("extracting %s into %s", tarball, root)
    with tarfile.open(tarball) as archive:
        for member in _members(archive, tarball, sentinel):
            target = root.joinpath(*PurePosixPath(member.name).parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, _CHUNK)


def _local_tarball(item: VocTarball, places: Sequence[Path]) -> Path | None:
    """The first of ``places/<name>`` with the right md5; a wrong one is reported, never
    deleted; raises _Missing when the download target itself holds a wrong file."""
    for index, folder in enumerate(places):
        path = folder / item.name
        if not path.is_file():
            continue
        actual = _md5(path)
        if actual == item.md5:
            return path
        message = f"{path} has md5 {actual}, expected {item.md5}: incomplete or not the release"
        if index == len(places) - 1:  # root: a download would replace it
            raise _Missing(f"{message}; delete or replace it")
        log.warning("%s; ignored", message)
    return None


def _obtain(item: VocTarball, root: Path, url: str, tarball_dirs: Sequence[Path]) -> None:
    tarball = _local_tarball(item, [*tarball_dirs, root])
    if tarball is None:
        tarball = root / item.name
        log.info("downloading %s from %s", item.name, url)
        try:
            _fetch(url, tarball, item.md5)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            kept = tarball.with_name(tarball.name + ".part")
            resume = f"; {kept} is kept, run again to resume" if kept.is_file() else ""
            raise _Missing(f"download failed ({reason}){resume}") from None
    _extract(tarball, root, item.sentinel)
    if not (root / item.sentinel).is_file():
        raise _Missing(f"{tarball} holds no {item.sentinel}: not the VOC release?")


def download_voc(
    root: str | os.PathLike,
    *,
    items: Sequence[str] = tuple(VOC_TARBALLS),
    mirror: str | None = None,
    tarball_dirs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Obtain and extract the VOC ``items`` under ``root`` (module docstring); returns
    ``root/VOCdevkit``. Raises DownloadError naming what is missing, after trying every item."""
    unknown = [item for item in items if item not in VOC_TARBALLS]
    if unknown or not items:
        raise ValueError(f"VOC items {unknown}: choose from {list(VOC_TARBALLS)}")
    base = check_mirror(mirror) if mirror else None
    for folder in tarball_dirs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--tarballs {folder}: no such folder")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    missing = []
    for key in items:
        item = VOC_TARBALLS[key]
        url = f"{base}/{item.name}" if base else f"{VOC_BASE_URL}/{item.folder}/{item.name}"
        if (root / item.sentinel).is_file():
            log.info("%s: already in %s", key, root / "VOCdevkit")
            continue
        try:
            _obtain(item, root, url, [Path(folder) for folder in tarball_dirs])
        except _Missing as error:
            missing.append(
                f"  {item.name} (md5 {item.md5}): {error}. Get it from {url} and put it at "
                f"{root / item.name}"
            )
    if missing:
        got = len(items) - len(missing)
        raise DownloadError(
            f"got {got} of {len(items)} VOC items; missing:\n" + "\n".join(missing) + "\n"
            "then run again (or use --mirror URL, or --tarballs DIR holding the files)"
        )
    return root / "VOCdevkit"
