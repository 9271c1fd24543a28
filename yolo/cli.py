"""What the entry scripts share: logging set-up, config parsing, and turning the errors a user
can fix into one clear line and an exit code instead of a traceback."""

from __future__ import annotations

import logging
import os

from yolo.config import parse_config

# Errors whose message already says what to do; anything else keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, FloatingPointError)
EXIT_INTERRUPTED = 130


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_training(preset, argv: list[str] | None, description: str | None) -> int:
    """Parse ``argv`` over ``preset`` and train; 0 when done, 130 when stopped by a signal."""
    from yolo.train import fit

    config = parse_config(preset, argv, description)
    setup_logging()
    try:
        summary = fit(config)
    except USER_ERRORS as error:
        logging.getLogger("train").error("%s", error)
        return 1
    return EXIT_INTERRUPTED if summary.get("interrupted") else 0


def run_testing(preset, argv: list[str] | None, description: str | None) -> int:
    """Parse ``argv`` over ``preset`` and evaluate the weights it names."""
    from yolo.evaluate import run_test

    config = parse_config(preset, argv, description)
    setup_logging()
    try:
        run_test(config)
    except USER_ERRORS as error:
        logging.getLogger("test").error("%s", error)
        return 1
    return 0
