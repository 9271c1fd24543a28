"""yolo.rundir: one holder per run folder, stale locks taken over, debris of killed writes."""

import logging
import os
import subprocess
import sys
import time

import pytest

from yolo.rundir import LOCK_NAME, RunLock, check_writable, remove_stale_temp_files


def test_a_second_holder_fails_naming_the_first(tmp_path):
    with RunLock(tmp_path):
        assert f"pid {os.getpid()} on" in (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(FileExistsError, match=rf"in use by pid {os.getpid()} on .*--run"):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # released at exit: the next holder gets it
        pass


def test_another_process_holding_the_lock_is_named(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from yolo.rundir import RunLock; "
         f"l = RunLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=rf"in use by pid {holder.pid} on"):
            RunLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops a killed holder's lock: taken over, with a message
        try:
            with RunLock(tmp_path):
                break
        except FileExistsError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text("pid 4242 on gone-host\n")
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
    assert "from pid 4242 on gone-host, which is no longer running" in caplog.text


def test_temp_files_of_killed_writes_are_removed(tmp_path):
    debris = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".best.pt.q.tmp"]
    for path in debris:
        path.write_bytes(b"x" * 10)
    (tmp_path / "last.pt").write_bytes(b"keep")
    remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_an_unwritable_folder_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"cannot write to .*file/run.*choose another --out"):
        check_writable(blocker / "run", "--out")
    check_writable(tmp_path / "a" / "b", "--out")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
