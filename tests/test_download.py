"""utils.download and download_voc.py: fake tarballs, a substituted md5 table, file:// mirrors,
a local HTTP server (resume with Range, or not), offline messages, safe extraction. No network."""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import runpy
import tarfile
import threading
import urllib.error
from pathlib import Path

import pytest

from utils import download
from utils.download import DownloadError, VocTarball, download_voc

REPO = Path(__file__).resolve().parents[1]
TRAINVAL = "VOCtrainval_06-Nov-2007.tar"
SENTINEL = "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt"


def _tar(path: Path, members: dict[str, bytes | None]) -> bytes:
    """A tarball of regular files (``None``: a symlink to /etc/passwd); returns its bytes."""
    with tarfile.open(path, "w") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(info)
                continue
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path.read_bytes()


def _voc_tar(path: Path, year: str = "2007", split: str = "trainval") -> bytes:
    # sentinel first in the archive: the extraction must still write it last
    return _tar(
        path,
        {
            f"VOCdevkit/VOC{year}/ImageSets/Main/{split}.txt": b"000001\n",
            f"VOCdevkit/VOC{year}/Annotations/000001.xml": b"<annotation/>",
            f"VOCdevkit/VOC{year}/JPEGImages/000001.jpg": bytes(range(256)) * 40,
        },
    )


def _table(monkeypatch, **payloads: bytes) -> None:
    """Substitute the md5 table: item -> the md5 of the given tarball bytes."""
    table = dict(download.VOC_TARBALLS)
    for key, payload in payloads.items():
        item = table[key.replace("_", "-")]
        table[key.replace("_", "-")] = VocTarball(
            item.name, item.folder, hashlib.md5(payload).hexdigest(), item.sentinel
        )
    monkeypatch.setattr(download, "VOC_TARBALLS", table)


def _offline(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(download.urllib.request, "urlopen", refuse)


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Path:
    """A folder holding a fake 2007-trainval tarball, its md5 in the table."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    _table(monkeypatch, **{"2007_trainval": _voc_tar(folder / TRAINVAL)})
    return folder


# ------------------------------------------------------------------------------ mirrors, local


def test_file_mirror_extracts_into_the_default_layout_then_needs_nothing(
    tmp_path, mirror, monkeypatch
):
    root = tmp_path / "data"
    devkit = download_voc(root, items=["2007-trainval"], mirror=mirror.as_uri() + "/")
    assert devkit == root / "VOCdevkit"
    assert (root / SENTINEL).read_bytes() == b"000001\n"
    assert (devkit / "VOC2007/JPEGImages/000001.jpg").stat().st_size == 256 * 40
    assert (root / TRAINVAL).is_file() and not list(root.glob("*.part"))
    _offline(monkeypatch)
    download_voc(root, items=["2007-trainval"])  # extracted: nothing to fetch
    (root / SENTINEL).unlink()  # an interrupted extraction: redone from the tarball in root
    download_voc(root, items=["2007-trainval"])
    assert (root / SENTINEL).is_file()


def test_local_tarball_folder_is_used_in_place(tmp_path, mirror, monkeypatch):
    _offline(monkeypatch)
    root = tmp_path / "data"
    download_voc(root, items=["2007-trainval"], tarball_dirs=[mirror])
    assert (root / SENTINEL).is_file() and not (root / TRAINVAL).exists()


def test_wrong_tarball_in_root_is_reported_and_left_alone(tmp_path, mirror, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    (root / TRAINVAL).write_bytes(b"half a tarball")
    with pytest.raises(DownloadError, match=r"has md5 .*delete or replace it"):
        download_voc(root, items=["2007-trainval"], mirror=mirror.as_uri())
    assert (root / TRAINVAL).read_bytes() == b"half a tarball"


def test_corrupt_download_is_deleted_and_reported(tmp_path, mirror, monkeypatch):
    _table(monkeypatch, **{"2007_trainval": b"another release"})
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"the download has md5 .*corrupt, deleted"):
        download_voc(root, items=["2007-trainval"], mirror=mirror.as_uri())
    assert list(root.iterdir()) == []


# -------------------------------------------------------------------------------- HTTP, resume


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``files``; honours ``Range: bytes=N-`` when ``honour_range``; logs each request."""

    files: dict[str, bytes]  # set per server by the fixture
    honour_range: bool
    requests: list[tuple[str, str | None]]

    def do_GET(self):
        payload = self.files.get(self.path.rsplit("/", 1)[-1])
        self.requests.append((self.path, self.headers.get("Range")))
        if payload is None:
            self.send_error(404)
            return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and self.honour_range:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(payload):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(payload) - start))
        self.end_headers()
        self.wfile.write(payload[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A local HTTP server in a thread; yields (base URL, handler class)."""
    handler = type("Handler", (_Handler,), {"files": {}, "honour_range": True, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/voc", handler
    httpd.shutdown()
    httpd.server_close()


def test_partial_download_resumes_with_a_range_request(tmp_path, monkeypatch, server):
    url, handler = server
    payload = _voc_tar(tmp_path / "source.tar")
    handler.files[TRAINVAL] = payload
    _table(monkeypatch, **{"2007_trainval": payload})
    root = tmp_path / "data"
    root.mkdir()
    (root / f"{TRAINVAL}.part").write_bytes(payload[:5000])  # an interrupted download
    download_voc(root, items=["2007-trainval"], mirror=url)
    assert handler.requests == [(f"/voc/{TRAINVAL}", "bytes=5000-")]
    assert (root / TRAINVAL).read_bytes() == payload and (root / SENTINEL).is_file()
    assert not (root / f"{TRAINVAL}.part").exists()


def test_a_server_ignoring_range_restarts_the_download(tmp_path, monkeypatch, server):
    url, handler = server
    handler.honour_range = False
    payload = _voc_tar(tmp_path / "source.tar")
    handler.files[TRAINVAL] = payload
    _table(monkeypatch, **{"2007_trainval": payload})
    root = tmp_path / "data"
    root.mkdir()
    (root / f"{TRAINVAL}.part").write_bytes(b"x" * 5000)  # would corrupt an appended download
    download_voc(root, items=["2007-trainval"], mirror=url)
    assert handler.requests == [(f"/voc/{TRAINVAL}", "bytes=5000-")]  # asked, answered 200
    assert (root / TRAINVAL).read_bytes() == payload


def test_a_complete_partial_file_is_accepted_on_416(tmp_path, monkeypatch, server):
    url, handler = server
    payload = _voc_tar(tmp_path / "source.tar")
    handler.files[TRAINVAL] = payload
    _table(monkeypatch, **{"2007_trainval": payload})
    root = tmp_path / "data"
    root.mkdir()
    (root / f"{TRAINVAL}.part").write_bytes(payload)
    download_voc(root, items=["2007-trainval"], mirror=url)
    assert (root / SENTINEL).is_file()


def test_a_failed_download_keeps_the_partial_file_to_resume(tmp_path, monkeypatch, server):
    url, _ = server  # serves nothing: 404
    _table(monkeypatch, **{"2007_trainval": b"whatever"})
    root = tmp_path / "data"
    root.mkdir()
    (root / f"{TRAINVAL}.part").write_bytes(b"12345")
    with pytest.raises(DownloadError, match=r"download failed .*is kept, run again to resume"):
        download_voc(root, items=["2007-trainval"], mirror=url)
    assert (root / f"{TRAINVAL}.part").read_bytes() == b"12345"


# -------------------------------------------------------------------------------------- offline


def test_offline_one_message_names_each_file_its_url_and_place(tmp_path, monkeypatch):
    _offline(monkeypatch)
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as info:
        download_voc(root)
    message = str(info.value)
    assert message.startswith("got 0 of 3 VOC items; missing:")
    for item in download.VOC_TARBALLS.values():
        line = next(line for line in message.splitlines() if item.name in line)
        assert f"{download.VOC_BASE_URL}/{item.folder}/{item.name}" in line
        assert f"put it at {root / item.name}" in line and item.md5 in line


def test_some_obtained_some_missing(tmp_path, mirror, monkeypatch):
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"got 1 of 2 VOC items") as info:
        download_voc(root, items=["2007-trainval", "2007-test"], mirror=mirror.as_uri())
    assert "VOCtest_06-Nov-2007.tar" in str(info.value) and (root / SENTINEL).is_file()


def test_bad_items_and_mirrors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="2013-trainval"):
        download_voc(tmp_path, items=["2013-trainval"])
    with pytest.raises(FileNotFoundError, match="--tarballs"):
        download_voc(tmp_path, items=["2007-test"], tarball_dirs=[tmp_path / "nope"])
    for bad in ("ftp://host/voc", "/some/folder", "host/voc"):
        with pytest.raises(ValueError, match=r"--mirror .*--tarballs"):
            download_voc(tmp_path, items=["2007-test"], mirror=bad)


# ----------------------------------------------------------------------------- safe extraction


@pytest.mark.parametrize("name", ["VOCdevkit/../../escaped.txt", "/tmp/absolute.txt"])
def test_members_outside_root_are_refused_before_anything_is_written(tmp_path, monkeypatch, name):
    folder = tmp_path / "mirror"
    folder.mkdir()
    payload = _tar(folder / TRAINVAL, {SENTINEL: b"x\n", name: b"x"})
    _table(monkeypatch, **{"2007_trainval": payload})
    root = tmp_path / "deep" / "data"
    with pytest.raises(ValueError, match="unsafe member"):
        download_voc(root, items=["2007-trainval"], tarball_dirs=[folder])
    assert not (root / "VOCdevkit").exists() and not (tmp_path / "deep" / "escaped.txt").exists()


def test_links_are_not_extracted_and_the_sentinel_comes_last(tmp_path, monkeypatch):
    folder = tmp_path / "mirror"
    folder.mkdir()
    members = {SENTINEL: b"x\n", "VOCdevkit/VOC2007/link": None, "VOCdevkit/VOC2007/a.txt": b"a"}
    payload = _tar(folder / TRAINVAL, members)
    _table(monkeypatch, **{"2007_trainval": payload})
    with tarfile.open(folder / TRAINVAL) as archive:
        order = [m.name for m in download._members(archive, folder / TRAINVAL, SENTINEL)]
    assert order == ["VOCdevkit/VOC2007/a.txt", SENTINEL]
    root = tmp_path / "data"
    download_voc(root, items=["2007-trainval"], tarball_dirs=[folder])
    assert not (root / "VOCdevkit/VOC2007/link").exists()
    assert (root / "VOCdevkit/VOC2007/a.txt").read_bytes() == b"a"


# ------------------------------------------------------------------------------------------ CLI


def _main():
    return runpy.run_path(str(REPO / "download_voc.py"))["main"]


def test_cli_downloads_from_a_mirror(tmp_path, mirror, caplog):
    with caplog.at_level(logging.INFO):
        argv = ["--root", str(tmp_path / "data"), "--items", "2007-trainval"]
        code = _main()([*argv, "--mirror", mirror.as_uri()])
    assert code == 0 and (tmp_path / "data" / SENTINEL).is_file()
    assert f"--data-root {tmp_path / 'data' / 'VOCdevkit'}" in caplog.text


def test_cli_offline_is_one_error_and_exit_1(tmp_path, monkeypatch, caplog):
    _offline(monkeypatch)
    with caplog.at_level(logging.INFO):
        code = _main()(["--root", str(tmp_path / "data"), "--items", "2012-trainval"])
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert code == 1 and len(errors) == 1 and "Traceback" not in caplog.text
    assert "VOCtrainval_11-May-2012.tar" in errors[0].getMessage()


@pytest.mark.parametrize(
    ("argv", "match"),
    [(["--items", "2013"], "--items"), (["--mirror", "ftp://x"], "--mirror")],
)
def test_cli_bad_flags_are_one_line(argv, match):
    with pytest.raises(SystemExit) as info:
        _main()(argv)
    assert str(info.value).startswith("error: ") and match in str(info.value)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        _main()(["--help"])
    assert info.value.code == 0 and "--mirror" in capsys.readouterr().out
