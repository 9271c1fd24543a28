"""What a training run tells its user: the settings and schedule at the start, one line and
``results.png`` per epoch, the AP table per evaluation, and at the end where everything is and
the command to run next.

Logging is never worth a run: a tensorboard event or ``results.png`` that cannot be written (the
folder removed, the disk full) is reported once, in one warning naming the path, and training
goes on (:class:`BestEffort`, :class:`TensorboardLog`)."""

from __future__ import annotations

import logging
import math
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from utils.formats import detect_format, is_voc_set_folder
from utils.visualize import format_ap_table, plot_training_history, save_figure
from yolo.config import TrainConfig
from yolo.evaluate import log_evaluation, summary_line
from yolo.flags import config_to_dict
from yolo.schedule import LOW_LR_FRACTION, Schedule

log = logging.getLogger("yolo.train")


class BestEffort:
    """Runs writes that are worth less than the run: an ``OSError`` is reported once per path
    (one warning line) and swallowed; later writes are still tried, silently."""

    def __init__(self) -> None:
        self.failed: set[str] = set()

    def write(self, path: Path, write: Callable, *args, **kwargs) -> bool:
        """``write(*args, **kwargs)``; False when it failed."""
        try:
            write(*args, **kwargs)
        except OSError as error:
            self.report(path, error)
            return False
        return True

    def report(self, path: Path, error: OSError) -> None:
        """One warning line the first time ``path`` fails."""
        if str(path) not in self.failed:
            self.failed.add(str(path))
            log.warning("cannot write %s (%s): training goes on without it", path,
                        error.strerror or error)  # fmt: skip


class TensorboardLog:
    """A ``SummaryWriter`` whose failures are :class:`BestEffort`'s: every ``add_*`` call (and
    the close) goes through it. tensorboard writes from a thread that dies on an ``OSError`` and
    prints its traceback; while this is open, that thread's ``OSError`` is left to the next call
    here to report."""

    def __init__(self, log_dir: Path, purge_step: int, best_effort: BestEffort) -> None:
        self.log_dir, self.best_effort = log_dir, best_effort
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_hook
        self._writer: SummaryWriter | None = None
        try:  # opening writes the first events already
            self._writer = SummaryWriter(log_dir, purge_step=purge_step)
        except OSError as error:
            best_effort.report(log_dir, error)

    def __getattr__(self, name: str):  # called for the writer's methods only
        if name.startswith("_"):
            raise AttributeError(name)
        if self._writer is None:
            return lambda *args, **kwargs: False
        method = getattr(self._writer, name)
        return lambda *args, **kwargs: self.best_effort.write(self.log_dir, method, *args,
                                                              **kwargs)  # fmt: skip

    def __enter__(self) -> TensorboardLog:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._writer is not None:
                self.best_effort.write(self.log_dir, self._writer.close)
        finally:
            threading.excepthook = self._previous_hook

    def _thread_hook(self, args) -> None:
        if not (
            isinstance(args.exc_value, OSError) and "AsyncWriter" in type(args.thread).__name__
        ):
            self._previous_hook(args)


def config_text(config) -> str:
    return "\n".join(f"{name}: {value}" for name, value in config_to_dict(config).items())


def report_start(config: TrainConfig, schedule: Schedule) -> None:
    log.info("config:\n%s", config_text(config))
    log.info("%s", schedule.describe())
    low = schedule.low_lr_share()
    if low > 0.5:
        log.warning(
            "the learning rate stays below %.0f%% of --lr %.2g for %.0f%% of the run: raise "
            "--epochs or lower --burn-in / --lr-steps (steps are epochs)",
            100 * LOW_LR_FRACTION, config.lr, 100 * low,
        )  # fmt: skip


def record_epoch(state, metrics, schedule: Schedule, writer, whole: bool) -> None:
    """Append the epoch's row to the history (and its time to tensorboard if it ran whole)."""
    seconds = time.perf_counter() - metrics.started
    row = {"epoch": state.epoch, **{f"loss_{k}": v for k, v in metrics.means().items()}}
    row.update(lr=schedule.lr_at(max(state.iteration - 1, 0), state.epoch - 1),
               images_per_s=metrics.images_per_s, epoch_s=seconds if whole else None)  # fmt: skip
    state.history.append(row)
    if writer is not None and whole:
        writer.add_scalar("time/epoch_s", seconds, state.iteration)


def record_evaluation(state, res: dict, classes, writer, samples) -> None:
    """Best mAP so far, the history row's mAP, the AP table and tensorboard."""
    value = res["map_voc07"]
    if math.isfinite(value) and (state.best_map is None or value > state.best_map):
        state.best_map, state.best_epoch = value, state.epoch
    if not math.isfinite(value):
        log.warning("the validation set holds no (non-difficult) object: no mAP, no best.pt")
    if state.history and state.history[-1]["epoch"] == state.epoch:
        state.history[-1].update({k: res[k] for k in ("map_voc07", "map_voc12", "map_coco")})
    log.info("epoch %d: %s\n%s", state.epoch, summary_line(res), format_ap_table(res, classes))
    if writer is not None:
        log_evaluation(writer, res, samples, classes, state.iteration)


def report_epoch(
    state, config: TrainConfig, run_dir: Path, best_effort: BestEffort | None = None
) -> None:
    """One console line per epoch, and results.png redrawn in the run folder (a failed write
    is ``best_effort``'s to report)."""
    row = state.history[-1] if state.history else {}
    parts = [f"epoch {state.epoch}/{config.epochs}"]
    if "loss_total" in row:
        parts.append(f"loss {row['loss_total']:.3f}")
        parts.append(f"lr {row['lr']:.2e}")
        parts.append(f"{row['images_per_s']:.1f} img/s")
    if row.get("epoch_s") is not None:
        parts.append(f"{row['epoch_s']:.0f} s")
    if row.get("map_voc07") is not None:
        best = "none" if state.best_map is None else f"{state.best_map:.4f} at {state.best_epoch}"
        parts.append(f"mAP07 {row['map_voc07']:.4f} (best {best})")
    log.info("%s", "  ".join(parts))
    if state.history:
        figure, path = plot_training_history(state.history), run_dir / "results.png"
        (best_effort or BestEffort()).write(path, save_figure, figure, path)


def report_end(state, config: TrainConfig, run_dir: Path, log_dir: Path) -> None:
    """Where everything is, the best epoch, and the command to run next."""
    evaluated = [row["map_voc07"] for row in state.history if "map_voc07" in row]
    lines = [f"finished {state.epoch} epochs of run {config.run}"]
    if state.best_map is not None and evaluated:
        lines.append(
            f"best VOC07 mAP {state.best_map:.4f} at epoch {state.best_epoch}, last "
            f"{evaluated[-1]:.4f}"
        )
    has_best = (run_dir / "best.pt").is_file()  # a run resumed from another's may have none
    best = run_dir / ("best.pt" if has_best else "last.pt")
    if has_best:
        lines.append(f"checkpoints: {run_dir / 'best.pt'} (best mAP), {run_dir / 'last.pt'}")
    else:
        why = "no mAP" if state.best_map is None else "its best epoch was not trained here"
        lines.append(f"checkpoint:  {run_dir / 'last.pt'} ({why}, so no best.pt)")
    lines += [
        f"curves:      {run_dir / 'results.png'}; tensorboard --logdir {log_dir.parent}",
        f"next:        {_test_command(config, best)}",
    ]
    sys.stdout.write("\n" + "\n".join(lines) + "\n")


def _test_command(config: TrainConfig, weights: Path) -> str:
    script = "test_resnet101.py" if config.model == "resnet101" else (
        "test_resnet18.py" if config.model.startswith("resnet") else "test_yolov2.py"
    )  # fmt: skip
    args = ["python", script, "--weights", str(weights)]
    if config.demo:
        args.append("--demo")
    elif config.data:  # the same --data: its val split is what training evaluated
        args += ["--data", config.data]
        args += ["--data-format", config.data_format] if config.data_format else []
        voc = (config.data_format or detect_format(config.data)) == "voc"
        if voc and not is_voc_set_folder(config.data):  # a VOC<NAME> folder: its own val split
            args += ["--val-set", config.val_set]
    else:
        args += ["--data-root", config.data_root, "--val-set", config.val_set]
    return shlex.join(args)


def resume_command(config: TrainConfig) -> str:
    """The command that continues this run with its own settings."""
    args = ["python", Path(sys.argv[0]).name, "--run-name", config.run, "--resume"]
    if config.model_dir != "model":
        args += ["--model-dir", config.model_dir]
    return shlex.join(args)
