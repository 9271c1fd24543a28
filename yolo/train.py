"""Training engine: :func:`fit` runs a training. Everything is built once at the top of ``fit``
into a :class:`Run`; the epoch loop below it is the whole life of a run: :func:`train_epoch`
(:func:`yolo.epoch.train_one_epoch`), then :func:`close_epoch` (evaluation when due, with
:func:`yolo.evaluate.evaluate`, and the epoch's report).

Every tensorboard tag is logged against the optimizer step (darknet's iteration), so that a
resumed run purges exactly the steps an interrupted one logged after its checkpoint.

What a run survives: ``last.pt`` is written at every epoch's end *before* the evaluation (a
stop during it loses nothing; the evaluation runs again on resume), ``best.pt`` is written
before the ``last.pt`` that records its mAP, so the two always agree; SIGINT, SIGTERM, SIGHUP
and a killed data loader worker save at the last optimizer step; weights that become
non-finite stop the run before anything is saved; one process at a time holds the run folder.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils.anchors import anchors_for_size, anchors_img_size
from utils.loader import data_record
from yolo.build import build_loaders, build_training, initial_weights, resolve_run_classes
from yolo.checkpoint import (
    check_resume_data,
    checkpoint_to_resume,
    resolve_resume,
    restore_training,
    resume_path,
    save_checkpoint,
    training_checkpoint,
)
from yolo.config import TrainConfig
from yolo.demo import resolve_demo
from yolo.ema import WeightEMA, ema_terms
from yolo.epoch import DataLoaderDied, TrainState, train_one_epoch
from yolo.evaluate import evaluate
from yolo.flags import save_config_json
from yolo.load import resolve_anchors
from yolo.release import release_checkpoint
from yolo.report import (
    BestEffort,
    TensorboardLog,
    config_text,
    record_epoch,
    record_evaluation,
    report_end,
    report_epoch,
    report_start,
    resume_command,
)
from yolo.rundir import NewFolders, RunLock, check_writable, remove_stale_temp_files
from yolo.runtime import (
    Runtime,
    StopRequest,
    broadcast_flag,
    launch_identity,
    seed_everything,
    setup_runtime,
    teardown_runtime,
)
from yolo.schedule import Schedule, build_schedule, multiscale_sizes

log = logging.getLogger(__name__)


def _items_to_skip(state: TrainState, runtime: Runtime) -> int:
    """This process's items of the epoch already trained (resume by images, not batches)."""
    if state.epoch_images % runtime.world_size:
        raise ValueError(
            f"cannot resume mid-epoch: {state.epoch_images} images of epoch {state.epoch + 1} "
            f"were done, which {runtime.world_size} processes cannot share evenly; resume with "
            "the number of processes the run had"
        )
    return state.epoch_images // runtime.world_size


@dataclass(frozen=True)
class Run:
    """What :func:`fit` builds once and every epoch uses; the counters live in :class:`TrainState`.

    ``model`` is what trains (the DDP wrapper under torchrun); ``writer`` is None off the main
    process.
    """

    config: TrainConfig
    runtime: Runtime
    run_dir: Path
    classes: tuple[str, ...]
    anchors: torch.Tensor  # [A, 2] grid cells
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    train_loader: object
    val_loader: object
    writer: TensorboardLog | None
    stop: StopRequest
    best_effort: BestEffort  # tensorboard and results.png: reported once, never fatal
    data: dict = field(default_factory=dict)  # what it trains and evaluates on (checkpoints)
    ema: WeightEMA | None = None  # --ema: the weights evaluated and saved as best.pt


def fit(config: TrainConfig) -> dict:
    """Train as ``config`` says; returns a summary (best mAP, paths, ``exit_code``)."""
    runtime = setup_runtime(config.device, config.amp)
    with ExitStack() as stack:
        stack.callback(teardown_runtime, runtime)
        config = resolve_resume(resolve_demo(config, runtime))
        run_dir, log_dir = Path(config.model_dir) / config.run, Path(config.log_dir) / config.run
        new_folders = NewFolders()
        if runtime.is_main:
            new_folders = _hold_run_folder(stack, run_dir, log_dir)
        seed_everything(config.seed)
        classes, anchors = resolve_run_classes(config), run_anchors(config, runtime.is_main)
        ckpt = checkpoint_to_resume(config, run_dir, classes, anchors, runtime.world_size)
        if ckpt is not None and _nothing_to_train(ckpt, config):
            return {"finished": True, "best_map": ckpt["state"]["best_map"], "exit_code": 0}
        train_loader, val_loader = build_loaders(config, classes, runtime)
        data = {"train": data_record(train_loader.dataset, classes),
                "val": data_record(val_loader.dataset, classes)}  # fmt: skip
        if ckpt is not None:
            check_resume_data(ckpt, data, config)
        model, criterion, optimizer, scaler = build_training(config, len(classes), anchors, runtime)
        state = _start_state(ckpt, config, model, optimizer, scaler)
        schedule = build_schedule(config, math.ceil(len(train_loader) / config.accum),
                                  len(train_loader.dataset))  # fmt: skip
        criterion.prior_seen = schedule.prior_images
        ema = _start_ema(ckpt, config, model, schedule)
        writer, best_effort = None, BestEffort()
        if runtime.is_main:
            writer = _open_writer(stack, config, schedule, log_dir, state.iteration, best_effort)
            save_config_json(config, run_dir / "config.json")
        run = Run(config, runtime, run_dir, classes, anchors, _wrap_ddp(model, runtime),
                  criterion, optimizer, scaler, schedule, train_loader, val_loader, writer,
                  stack.enter_context(StopRequest()), best_effort, data, ema)  # fmt: skip
        new_folders.keep()  # started: from here on the folders hold the run
        # pending: a resumed run that stopped in its evaluation finishes that epoch first
        interrupted = state.eval_pending and close_epoch(run, state)
        for _ in range(state.epoch, config.epochs):
            if interrupted:
                break
            interrupted = train_epoch(run, state)
            save(run, state, "last.pt")  # the trained epoch is safe before its evaluation
            interrupted = interrupted or close_epoch(run, state)
    if interrupted:
        log.warning("stopped; checkpoint saved to %s. Resume with:\n  %s", run_dir / "last.pt",
                    resume_command(config))  # fmt: skip
        return {"interrupted": True, "best_map": state.best_map, "exit_code": run.stop.exit_code}
    if runtime.is_main:
        report_end(state, config, run_dir, log_dir)
    return {"interrupted": False, "finished": True, "best_map": state.best_map, "exit_code": 0}


def run_anchors(config: TrainConfig, say: bool) -> torch.Tensor:
    """``[A, 2]`` grid cells: the anchors file's (fitted by kmeans.py at its ``img_size``, set to
    ``--eval-img-size``'s grid with ``--scale-anchors``), else darknet's; ``say``: the one
    warning line when the sizes differ, with the command that fits them at this size."""
    anchors = resolve_anchors(config.anchors)
    named = not config.anchors or not Path(config.anchors).is_file()  # a release's: no size
    fitted = None if named else anchors_img_size(config.anchors)
    if fitted is None or fitted == config.eval_img_size:
        return anchors
    anchors, line = anchors_for_size(anchors, fitted, config.eval_img_size,
                                     scale=config.scale_anchors)  # fmt: skip
    data = f"--data {config.data}" if config.data else (
        f"--data-root {config.data_root} --sets {' '.join(config.train_sets)}")  # fmt: skip
    data += f" --classes {config.classes}" if config.classes else ""
    if say:
        log.warning("anchors %s: %s; to fit them at this size: python kmeans.py %s --img-size %d",
                    config.anchors, line, data, config.eval_img_size)  # fmt: skip
    return anchors


def _hold_run_folder(stack: ExitStack, run_dir: Path, log_dir: Path) -> NewFolders:
    """Check both folders are writable, lock the run folder, clear a killed write's debris;
    the folders this creates go again unless the start succeeds."""
    new_folders = stack.enter_context(NewFolders(run_dir, log_dir))
    check_writable(run_dir, "--model-dir")
    check_writable(log_dir, "--log-dir")
    stack.enter_context(RunLock(run_dir))
    remove_stale_temp_files(run_dir)
    return new_folders


def _nothing_to_train(ckpt: dict, config: TrainConfig) -> bool:
    """True (and says so in one line) when the checkpoint to resume has trained ``--epochs``
    already: nothing is trained, written or claimed."""
    state = ckpt["state"]
    if state["epoch"] < config.epochs or state["eval_pending"]:
        return False
    log.info("nothing to train: %s already finished %d epochs and --epochs is %d; raise "
             "--epochs above %d to train further", resume_path(config), state["epoch"],
             config.epochs, state["epoch"])  # fmt: skip
    return True


def _start_state(ckpt: dict | None, config: TrainConfig, model, optimizer, scaler) -> TrainState:
    """A resumed run's counters, weights, optimizer and RNG; or a new run's initial weights."""
    if ckpt is not None:
        return TrainState(**restore_training(ckpt, model, optimizer, scaler, config.resume))
    if config.weights:
        initial_weights(model, config.weights)
    return TrainState()


def _start_ema(ckpt: dict | None, config: TrainConfig, model, schedule) -> WeightEMA | None:
    """With ``--ema``: the average, restored from a resumed checkpoint's (bit-exact resume)."""
    if not config.ema:
        return None
    run_steps = schedule.epochs * schedule.steps_per_epoch
    decay, ramp = ema_terms(config.ema_decay, run_steps, config.ema_share)
    ema = WeightEMA(model, decay=decay, ramp=ramp)
    window = 1.0 / (1.0 - decay)
    log.info("weight EMA: decay %.4g, an average over about the last %.0f steps (%.1f epochs), "
             "ramping up with a time constant of %.0f steps; evaluated and saved as best.pt",
             decay, window, window / schedule.steps_per_epoch, ramp)  # fmt: skip
    if ckpt is not None and "ema" in ckpt:
        ema.load_state_dict(ckpt["ema"])
    elif ckpt is not None:
        log.warning("--ema: %s was trained without it; the average starts from its weights",
                    resume_path(config))  # fmt: skip
    return ema


def _open_writer(stack, config, schedule, log_dir: Path, step: int, best_effort: BestEffort):
    """Report the settings and open tensorboard, purging steps after ``step`` (what an
    interrupted run logged after its checkpoint)."""
    report_start(config, schedule)
    writer = stack.enter_context(TensorboardLog(log_dir, step, best_effort))
    writer.add_text("config", f"```\n{config_text(config)}\n```", step)
    return writer


def save(run: Run, state: TrainState, name: str) -> None:
    """Write checkpoint ``name`` of the run folder (on the main process only)."""
    if run.runtime.is_main:
        saved = training_checkpoint(run.model, run.optimizer, run.scaler, state, run.config,
                                    run.classes, run.anchors)  # fmt: skip
        saved.update(data=run.data, launch=launch_identity())  # what a resume checks
        if run.ema is not None:  # last.pt: both, the raw weights to train on, the EMA to resume
            saved["ema"] = run.ema.state_dict()
        if name == "best.pt":  # the file to share: what inference needs, a third of last.pt
            saved = release_checkpoint(saved)
            if run.ema is not None:  # the weights that were evaluated
                saved["model"] = saved.pop("ema")["model"]
        save_checkpoint(saved, run.run_dir / name)


def train_epoch(run: Run, state: TrainState) -> bool:
    """Train the rest of the epoch and record it; True when a stop cut it short."""
    config = run.config
    run.train_loader.sampler.set_epoch(state.epoch, start=_items_to_skip(state, run.runtime))
    whole = state.epoch_images == 0
    try:
        metrics, stopped = train_one_epoch(
            run.model, run.criterion, run.train_loader, run.optimizer, run.scaler, state,
            schedule=run.schedule, sizes=multiscale_sizes(config),
            size_every=config.multi_scale_every, seed=config.seed, accum=config.accum,
            runtime=run.runtime, writer=run.writer, stop=run.stop, ema=run.ema,
        )  # fmt: skip
    except DataLoaderDied as error:
        save(run, state, "last.pt")
        saved = f"saved at iteration {state.iteration}" if run.runtime.is_main else "in last.pt"
        raise ChildProcessError(
            f"{error}: a data loader worker was killed (out of memory?). The run is {saved}; "
            f"resume with fewer workers: {resume_command(config)} --workers "
            f"{max(1, config.workers // 2)}"  # the same weights with any count but 0 vs 1+
        ) from None
    if not stopped:
        state.epoch, state.batch, state.epoch_images = state.epoch + 1, 0, 0
        state.eval_pending = state.epoch % config.eval_every == 0 or state.epoch == config.epochs
        record_epoch(state, metrics, run.schedule, run.writer, whole)
        state.loss_sums, state.loss_steps = {}, 0
    return stopped


def close_epoch(run: Run, state: TrainState) -> bool:
    """Evaluate the trained epoch if it is due, then report it; True when a stop cut the
    evaluation short (nothing is reported then)."""
    if state.eval_pending and not evaluate_epoch(run, state):
        return True
    if run.runtime.is_main:
        report_epoch(state, run.config, run.run_dir, run.best_effort)
    return False


def evaluate_epoch(run: Run, state: TrainState) -> bool:
    """Evaluate the trained epoch, save best.pt (if best) then last.pt; False when a stop cut
    the evaluation short."""
    config = run.config
    model = run.ema.module if run.ema is not None else run.model  # --ema: the average's mAP
    res, samples = evaluate(
        model, run.val_loader, run.anchors, runtime=run.runtime, class_names=run.classes,
        conf_threshold=config.conf_threshold, nms_threshold=config.nms_threshold,
        num_vis_images=config.num_vis_images if run.writer else 0, stop=run.stop,
    )  # fmt: skip
    if broadcast_flag(run.stop.requested, run.runtime):
        return False
    state.eval_pending = False
    if res is not None:
        record_evaluation(state, res, run.classes, run.writer, samples)
        if state.best_epoch == state.epoch:
            save(run, state, "best.pt")  # before the last.pt that records it as the best
    save(run, state, "last.pt")
    return True


def _wrap_ddp(model: nn.Module, runtime: Runtime) -> nn.Module:
    if not runtime.distributed:
        return model
    device = runtime.device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
