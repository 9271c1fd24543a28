"""What the entry scripts share: config parsing, logging set-up, and turning the errors a user
can fix into one clear line and an exit code instead of a traceback (``--debug`` or
``YOLO_DEBUG=1`` shows it)."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

from yolo.flags import parse_args

# Errors whose message already says what to do: a missing or unwritable file, a full disk, a
# value out of range, a missing optional package, no network. Anything else keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)
EXIT_ERROR = 1

log = logging.getLogger("yolo")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run(
    preset,
    argv: list[str] | None,
    description: str | None,
    job: Callable | str,
    prepare: Callable | str | None = None,
) -> int:
    """Parse ``argv`` over ``preset``, run ``job(config)`` and return the exit code.

    ``prepare(config, given)``, when given, may rewrite the config from the set of flags the
    command line gave (training uses it to resume with the run's own settings). A job's
    result may carry ``"exit_code"`` (e.g. 130 after Ctrl-C); user errors give 1. ``job`` and
    ``prepare`` may be named ``"module:function"``: imported only once the flags parsed, so
    ``--help`` and a mistyped flag answer without importing torch.
    """
    config, given = parse_args(preset, argv, description)
    setup_logging()
    debug = "debug" in given or os.environ.get("YOLO_DEBUG") == "1"
    try:
        if prepare is not None:
            config = resolve(prepare)(config, given - {"debug"})
        result = resolve(job)(config)
    except USER_ERRORS as error:
        if debug:
            log.exception("%s", error)
        else:
            log.error("%s", _one_line(error))
        return EXIT_ERROR
    return result.get("exit_code", 0) if isinstance(result, dict) else 0


def resolve(target: Callable | str) -> Callable:
    """``"package.module:function"`` -> the function (imported now); a callable as it is."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _one_line(error: BaseException) -> str:
    """The error's message; an ``OSError`` without one says what failed on which file."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error) or type(error).__name__
