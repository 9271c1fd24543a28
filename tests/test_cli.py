"""yolo.cli: one run() for every entry script; user errors are one line, not a traceback."""

import errno
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from yolo.cli import run
from yolo.config import TestConfig, TrainConfig
from yolo.runtime import StopRequest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("--weights x.pt does not fit this model: use --model tiny"),
        OSError(errno.ENOSPC, "cannot write model/r/last.pt: the disk is full (9 MB needed)"),
        ConnectionError("could not download https://example/x; put it at /cache/x"),
        FileNotFoundError(2, "No such file or directory", "data/VOCdevkit"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(error, caplog):
    def job(config):
        raise error

    assert run(TestConfig(), [], None, job) == 1
    assert "Traceback" not in caplog.text
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and "\n" not in record.getMessage()
    assert "Errno" not in record.getMessage()


def test_debug_shows_the_traceback_and_bugs_keep_theirs(caplog):
    def job(config):
        raise ValueError("bad value")

    assert run(TestConfig(), ["--debug"], None, job) == 1
    assert "Traceback" in caplog.text

    def bug(config):
        raise KeyError("a bug, not the user's mistake")

    with pytest.raises(KeyError):
        run(TestConfig(), [], None, bug)


def test_exit_code_and_prepare_come_from_the_job():
    seen = {}

    def prepare(config, given):
        seen["given"] = given
        return config

    def job(config):
        seen["epochs"] = config.epochs
        return {"exit_code": 143}

    assert run(TrainConfig(), ["--epochs", "7", "--debug"], None, job, prepare=prepare) == 143
    assert seen == {"given": {"epochs"}, "epochs": 7}


def test_ctrl_c_twice_stops_at_once():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_sigterm_ends_the_process_with_143():
    code = (
        "import signal; from yolo.runtime import StopRequest\n"
        "with StopRequest() as stop:\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    assert stop.exit_code == 143\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    print('still running')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGTERM and "still running" not in result.stdout


# Runs an entry script's --help, then says which heavy packages that imported.
HELP_RUNNER = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    assert done.code in (0, None), done.code
print(sorted(name for name in ("torch", "torchvision", "numpy", "PIL") if name in sys.modules))
"""
ENTRY_SCRIPTS = sorted(path.name for path in REPO.glob("*.py") if path.name != "hubconf.py")


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_help_and_flag_parsing_import_no_torch(script):
    result = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, script], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-300:]


def test_a_job_named_by_string_is_imported_once_the_flags_parsed():
    assert run(TrainConfig(), ["--epochs", "3"], None, "yolo.flags:config_to_dict") == 0
    with pytest.raises(SystemExit):
        run(TrainConfig(), ["--epochs", "0"], None, "no.such.module:job")  # parse fails first
