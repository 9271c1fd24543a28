"""utils.fileio: atomic writes keep the previous file on errors and give normal permissions."""

import os
import stat

import pytest

from utils.fileio import atomic_open, atomic_path, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_mode_is_that_of_a_plain_new_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        atomic_write_text(tmp_path / "sub" / "atomic.txt", "x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "sub" / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask


def test_an_error_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "a.json", "old\n")
    with pytest.raises(RuntimeError, match="midway"), atomic_open(path, "w") as handle:
        handle.write("new, partial")
        raise RuntimeError("midway")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_renames_only_at_the_end(tmp_path):
    target = tmp_path / "model.onnx"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"\x00\x01")
        assert not target.exists()
    assert target.read_bytes() == b"\x00\x01" and not tmp.exists()
