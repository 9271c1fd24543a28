"""Training engine: :func:`fit` runs a training, :func:`train_one_epoch` and :func:`evaluate` are
its parts. Objects are built once in :func:`fit` and passed in explicitly.

Every tensorboard tag is logged against the optimizer step (darknet's iteration), so that a
resumed run purges exactly the steps an interrupted one logged after its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shlex
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.transforms import (
    MULTISCALE_SIZES,
    resize_batch,
)
from utils.visualize import format_ap_table
from yolo.build import (
    build_loaders,
    build_training,
    lr_schedule,
    resolve_anchors,
    resolve_classes,
    resolve_demo,
)
from yolo.checkpoint import (
    check_resumable,
    load_checkpoint,
    load_model_weights,
    restore_training,
    save_checkpoint,
    training_checkpoint,
)
from yolo.config import config_to_dict, save_config_json
from yolo.evaluate import evaluate, log_evaluation
from yolo.runtime import (
    Runtime,
    StopRequest,
    broadcast_flag,
    seed_everything,
    setup_runtime,
    teardown_runtime,
)

log = logging.getLogger(__name__)

LOSS_TERMS = ("total", "coord", "obj", "noobj", "cls", "prior")


@dataclass
class TrainState:
    """Counters that locate a run in its schedule; all saved in the checkpoint."""

    epoch: int = 0  # the epoch in progress (or the next one, between epochs)
    batch: int = 0  # batches of ``epoch`` already done
    iteration: int = 0  # optimizer steps so far
    batches: int = 0  # batches so far, over all epochs (drives multi-scale)
    seen: int = 0  # images seen by the whole run (drives the loss's prior term)
    best_map: float | None = None  # best val map_voc07 so far


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def train_size(batches: int, *, seed: int, sizes: tuple[int, ...], every: int) -> int:
    """Multi-scale size of batch number ``batches``: one random size per block of ``every``,
    drawn from (seed, block) alone, so every rank and a resumed run agree."""
    return random.Random(seed * 1_000_003 + batches // every).choice(sizes)


def _multiscale_sizes(config) -> tuple[int, ...]:
    if not config.multi_scale:
        return (config.img_size,)
    return tuple(s for s in MULTISCALE_SIZES if config.min_size <= s <= config.max_size) or (
        config.img_size,
    )


def _loss_terms(criterion, raw, targets, state: TrainState) -> dict[str, torch.Tensor]:
    try:
        terms = criterion(raw, targets, seen=state.seen)
    except ValueError as error:
        raise FloatingPointError(
            f"stopping at iteration {state.iteration} (epoch {state.epoch}, batch "
            f"{state.batch}): {error}. Checkpoints were left as they were; try a lower --lr."
        ) from None
    return terms


def _finite_values(means: dict[str, torch.Tensor], state: TrainState) -> dict[str, float]:
    """The step's mean loss terms as floats, in one device-to-host copy; a non-finite term
    stops the run."""
    stacked = torch.stack([value.float() for value in means.values()])  # [T]
    values = dict(zip(means, stacked.tolist(), strict=True))
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"non-finite loss at iteration {state.iteration} (epoch {state.epoch}): {bad}. "
            "Checkpoints were left as they were; try a lower --lr."
        )
    return values


def _optimizer_step(optimizer, scaler: torch.amp.GradScaler, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)  # skips the step when AMP found inf/NaN gradients
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _log_step(writer, values: dict[str, float], lr: float, size: int, step: int) -> None:
    for key, value in values.items():
        writer.add_scalar(f"train/loss_{key}", value, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/img_size", size, step)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    *,
    config,
    runtime: Runtime,
    lr_at,
    writer=None,
    stop: StopRequest | None = None,
) -> dict:
    """One epoch (or its rest, after a mid-epoch resume); stops early at an optimizer step when
    a stop is requested. ``lr_at(iteration, epoch)`` gives the learning rate."""
    model.train()
    device, sizes = runtime.device, _multiscale_sizes(config)
    num_batches, accumulated = len(loader), 0
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    timing, images_done = {"data_s": 0.0, "compute_s": 0.0}, 0
    bar = tqdm(
        total=num_batches,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        disable=not runtime.is_main,
        dynamic_ncols=True,
        leave=False,
    )
    interrupted, tick = False, time.perf_counter()
    for index, (images, targets, _) in enumerate(loader):
        fetched = time.perf_counter()
        timing["data_s"] += fetched - tick
        size = train_size(
            state.batches, seed=config.seed, sizes=sizes, every=config.multi_scale_every
        )
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if images.shape[-1] != size or images.shape[-2] != size:
            images = resize_batch(images, size)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        step_now = accumulated + 1 == config.accum or index + 1 == num_batches
        sync = nullcontext() if step_now or not runtime.distributed else model.no_sync()
        with sync:
            with torch.autocast(
                device.type,
                dtype=runtime.amp_dtype or torch.float32,
                enabled=runtime.amp_dtype is not None,
            ):
                raw = model(images)
            terms = _loss_terms(criterion, raw, targets, state)
            scaler.scale(terms["total"] / config.accum).backward()
        for key in LOSS_TERMS:
            sums[key] += terms[key].detach()
        accumulated += 1
        images_done += images.shape[0]
        state.batch, state.batches = state.batch + 1, state.batches + 1
        state.seen += images.shape[0] * runtime.world_size
        if step_now:
            lr = lr_at(state.iteration, state.epoch)
            means = {k: v / accumulated for k, v in sums.items()}
            _optimizer_step(optimizer, scaler, lr)
            values = _finite_values(means, state)
            if writer is not None:
                _log_step(writer, values, lr, size, state.iteration)
            state.iteration += 1
            sums.clear()
            accumulated = 0
            shown = {k: f"{v:.3f}" for k, v in values.items() if k != "prior"}
            bar.set_postfix(
                **shown,
                lr=f"{lr:.2e}",
                size=size,
                img_s=f"{images_done / max(bar.format_dict['elapsed'], 1e-9):.1f}",
            )
            interrupted = stop is not None and broadcast_flag(stop.requested, runtime)
        bar.update(1)
        tick = time.perf_counter()
        timing["compute_s"] += tick - fetched
        if interrupted:
            break
    bar.close()
    return {"images": images_done, "interrupted": interrupted, **timing}


def set_loader_epoch(loader, epoch: int, start: int = 0) -> None:
    """Tell the loader's seeded sampler which epoch it is and how many items to skip."""
    for sampler in (
        loader.sampler,
        loader.batch_sampler,
        getattr(loader.batch_sampler, "sampler", None),
    ):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch, start=start)
            return
    raise TypeError("the training loader has no seeded sampler with set_epoch()")


def print_locations(run: str, log_dir: str, model_dir: str) -> None:
    """Where the results are, for the person at the terminal."""
    sys.stdout.write(
        f"\nlogs:        {log_dir}/{run}\ncheckpoints: {model_dir}/{run}/{{last,best}}.pt\n"
        f"tensorboard: tensorboard --logdir {log_dir}\n"
    )


def summary_line(res: dict) -> str:
    keys = ("map_voc07", "map_voc12", "map_coco", "ap50_coco", "ap75_coco")
    return json.dumps({k: round(res[k], 4) for k in keys})


def _resume_command() -> str:
    args = [a for a in sys.argv[1:] if a != "--resume"]
    return shlex.join(["python", sys.argv[0], *args, "--resume"])


def fit(config) -> dict:
    """Train as ``config`` says; returns a summary (best map, last metrics, paths)."""
    config = resolve_demo(config)
    runtime = setup_runtime(config.device, config.amp)
    try:
        return _fit(config, runtime)
    finally:
        teardown_runtime(runtime)


@dataclass(kw_only=True)
class Run:
    """Everything a training run is made of, built once by :func:`fit` for the epoch loop."""

    config: Any
    runtime: Runtime
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: TrainState
    train_loader: Any
    val_loader: Any
    classes: tuple[str, ...]
    anchors: torch.Tensor
    writer: SummaryWriter | None
    run_dir: Path  # model/<run>/


def _checkpoint_to_resume(config, run_dir: Path, classes, anchors) -> dict | None:
    """The checkpoint ``--resume`` names (checked against this run), or None for a new run."""
    if not config.resume:
        if (run_dir / "last.pt").exists():
            raise FileExistsError(
                f"run {config.run!r} already has checkpoints in {run_dir}: continue it with "
                f"--resume, start another with --run NAME, or delete {run_dir} to start over"
            )
        return None
    path = run_dir / "last.pt" if config.resume == "last" else Path(config.resume)
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, config, classes, anchors, path)
    return ckpt


def _open_writer(config, run_dir: Path, log_dir: str, step: int) -> SummaryWriter:
    """Rank 0's tensorboard writer (steps after ``step`` purged) and the saved config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config_json(config, run_dir / "config.json")
    writer = SummaryWriter(log_dir, purge_step=step or None)
    text = json.dumps(config_to_dict(config), indent=2)
    writer.add_text("config", f"```\n{text}\n```", step)
    return writer


def _fit(config, runtime: Runtime) -> dict:
    seed_everything(config.seed)
    classes, anchors = resolve_classes(config.classes), resolve_anchors(config.anchors)
    run_dir = Path(config.model_dir) / config.run
    summary = {"run_dir": str(run_dir), "log_dir": str(Path(config.log_dir) / config.run)}
    ckpt = _checkpoint_to_resume(config, run_dir, classes, anchors)
    if ckpt is not None and ckpt["state"]["epoch"] >= config.epochs:
        log.info(
            "run %s already finished %d epochs: nothing to resume; raise --epochs to train further",
            config.run,
            ckpt["state"]["epoch"],
        )
        return {**summary, "finished": True, "best_map": ckpt["state"]["best_map"]}
    if runtime.is_main:
        log.info("config:\n%s", json.dumps(config_to_dict(config), indent=2))
    train_loader, val_loader = build_loaders(config, classes, runtime)
    model, criterion, optimizer, scaler = build_training(config, len(classes), anchors, runtime)
    state = TrainState()
    if ckpt is not None:
        state = TrainState(**restore_training(ckpt, model, optimizer, scaler))
    elif config.weights:
        load_model_weights(model, load_checkpoint(config.weights)["model"], config.weights)
    if runtime.distributed:
        device = runtime.device
        model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    writer = None
    if runtime.is_main:
        writer = _open_writer(config, run_dir, summary["log_dir"], state.iteration)
    run = Run(
        config=config, runtime=runtime, model=model, criterion=criterion, optimizer=optimizer,
        scaler=scaler, state=state, train_loader=train_loader, val_loader=val_loader,
        classes=classes, anchors=anchors, writer=writer, run_dir=run_dir,
    )  # fmt: skip
    try:
        return {**summary, **_loop(run)}
    finally:
        if writer is not None:
            writer.close()


def _save_epoch(run: Run, res: dict | None, started: float) -> None:
    """Rank 0: ``last.pt`` (and ``best.pt`` on a new best), the epoch time."""
    state = run.state
    ckpt = training_checkpoint(
        run.model, run.optimizer, run.scaler, state, run.config, run.classes, run.anchors
    )
    save_checkpoint(ckpt, run.run_dir / "last.pt")
    if res is not None and res.get("is_best"):
        save_checkpoint(ckpt, run.run_dir / "best.pt")
    if run.writer is not None:
        run.writer.add_scalar("time/epoch_s", time.perf_counter() - started, state.iteration)
        run.writer.flush()


def _loop(run: Run) -> dict:
    config, runtime, state = run.config, run.runtime, run.state
    lr_at = lr_schedule(config)
    with StopRequest() as stop:
        while state.epoch < config.epochs:
            started, res = time.perf_counter(), None
            set_loader_epoch(run.train_loader, state.epoch, start=state.batch * config.batch_size)
            stats = train_one_epoch(
                run.model, run.criterion, run.train_loader, run.optimizer, run.scaler, state,
                config=config, runtime=runtime, lr_at=lr_at, writer=run.writer, stop=stop,
            )  # fmt: skip
            if not stats["interrupted"]:
                state.epoch, state.batch = state.epoch + 1, 0
                if state.epoch % config.eval_every == 0 or state.epoch == config.epochs:
                    res = _evaluate_epoch(run)
            if runtime.is_main:
                _save_epoch(run, res, started)
            if stats["interrupted"] or broadcast_flag(stop.requested, runtime):
                log.warning(
                    "stopped; checkpoint saved to %s. Resume with:\n  %s",
                    run.run_dir / "last.pt",
                    _resume_command(),
                )
                return {"interrupted": True, "best_map": state.best_map}
    if runtime.is_main:
        print_locations(config.run, config.log_dir, config.model_dir)
    return {"interrupted": False, "best_map": state.best_map, "finished": True}


def _evaluate_epoch(run: Run) -> dict | None:
    config, state, writer, classes = run.config, run.state, run.writer, run.classes
    res, samples = evaluate(
        run.model,
        run.val_loader,
        run.anchors,
        runtime=run.runtime,
        class_names=classes,
        conf_threshold=config.conf_threshold,
        nms_threshold=config.nms_threshold,
        num_vis_images=config.num_vis_images if writer else 0,
    )
    if res is None:
        return None
    value = res["map_voc07"]
    res["is_best"] = math.isfinite(value) and (state.best_map is None or value > state.best_map)
    if res["is_best"]:
        state.best_map = value
    log.info(
        "epoch %d/%d: %s\n%s",
        state.epoch,
        config.epochs,
        summary_line(res),
        format_ap_table(res, classes),
    )
    if writer is not None:
        log_evaluation(writer, res, samples, classes, state.iteration)
    return res
