"""Training engine: :func:`fit` runs a training, :func:`train_one_epoch` and
:func:`yolo.evaluate.evaluate` are its parts. Objects are built once at the top of ``fit`` and
passed in explicitly; the epoch loop below them is the whole life of a run.

Every tensorboard tag is logged against the optimizer step (darknet's iteration), so that a
resumed run purges exactly the steps an interrupted one logged after its checkpoint.

What a run survives: ``last.pt`` is written at every epoch's end *before* the evaluation (a
stop during it loses nothing; the evaluation runs again on resume), ``best.pt`` is written
before the ``last.pt`` that records its mAP, so the two always agree; SIGINT, SIGTERM, SIGHUP
and a killed data loader worker save at the last optimizer step; weights that become
non-finite stop the run before anything is saved; one process at a time holds the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.transforms import resize_batch
from yolo.build import (
    build_loaders,
    build_training,
    initial_weights,
    resolve_anchors,
    resolve_classes,
    resolve_demo,
)
from yolo.checkpoint import (
    checkpoint_to_resume,
    restore_training,
    save_checkpoint,
    training_checkpoint,
)
from yolo.config import TrainConfig, save_config_json
from yolo.evaluate import evaluate
from yolo.report import (
    config_text,
    record_epoch,
    record_evaluation,
    report_end,
    report_epoch,
    report_start,
    resume_command,
)
from yolo.rundir import RunLock, check_writable, remove_stale_temp_files
from yolo.runtime import (
    Runtime,
    StopRequest,
    broadcast_flag,
    seed_everything,
    setup_runtime,
    teardown_runtime,
    unwrap,
)
from yolo.schedule import Schedule, build_schedule, multiscale_sizes, train_size

log = logging.getLogger(__name__)

# What torch's DataLoader says when a worker process dies (not when its code raises)
WORKER_DIED = ("exited unexpectedly", "is killed by signal")


@dataclass
class TrainState:
    """Where a run is in its schedule; all of it is saved in the checkpoint."""

    epoch: int = 0  # epochs trained
    batch: int = 0  # batches of the epoch in progress done by this process
    epoch_images: int = 0  # images of the epoch in progress done by all processes
    iteration: int = 0  # optimizer steps so far
    batches: int = 0  # batches so far, over all epochs (drives multi-scale)
    seen: int = 0  # images seen by the whole run (drives the loss's prior term)
    best_map: float | None = None  # best val map_voc07 so far
    best_epoch: int | None = None
    eval_pending: bool = False  # epoch ``epoch`` is trained but not yet evaluated
    history: list[dict] = field(default_factory=list)  # one row per epoch, for results.png


class DataLoaderDied(RuntimeError):
    """A data loader worker died (usually killed for memory); the state is the last step's."""


class MetricLogger:
    """Running means of the loss terms and the time split of an epoch (torchvision's
    ``MetricLogger`` idea): ``update`` per optimizer step, ``means()`` at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.images = 0
        self.data_s = 0.0
        self.compute_s = 0.0
        self.started = time.perf_counter()

    def update(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] += value
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {key: total / max(self.steps, 1) for key, total in self.sums.items()}

    @property
    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    *,
    schedule: Schedule,
    sizes: tuple[int, ...],
    size_every: int,
    seed: int,
    accum: int,
    runtime: Runtime,
    writer: SummaryWriter | None = None,
    stop: StopRequest | None = None,
) -> tuple[MetricLogger, bool]:
    """One epoch (or its rest, after a mid-epoch resume) -> (metrics, interrupted).

    Steps the optimizer every ``accum`` batches; the batch is resized to a multi-scale size
    drawn from ``sizes`` every ``size_every`` batches. Stops early at an optimizer step when
    ``stop`` is requested. A dead data loader worker raises :class:`DataLoaderDied` with
    ``state`` set back to the last optimizer step, where the weights are.
    """
    model.train()
    metrics, sums, accumulated = MetricLogger(), {}, 0
    committed, interrupted, in_step = _commit(state, model), False, False
    bar = tqdm(total=len(loader), desc=f"epoch {state.epoch + 1}", disable=not runtime.is_main,
               dynamic_ncols=True, leave=False)  # fmt: skip
    tick = time.perf_counter()
    try:
        for index, (images, targets, _) in enumerate(loader):
            fetched = time.perf_counter()
            size = train_size(state.batches, seed=seed, sizes=sizes, every=size_every)
            images = resize_batch(runtime.to_device(images), size)
            targets = targets.to(runtime.device, non_blocking=True)
            step_now = accumulated + 1 == accum or index + 1 == len(loader)
            sync = nullcontext() if step_now or not runtime.distributed else model.no_sync()
            with sync:
                with runtime.autocast():
                    raw = model(images)
                terms = _loss_terms(criterion, raw, targets, state)
                scaler.scale(terms["total"] / accum).backward()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0) + value.detach()
            accumulated += 1
            done = images.shape[0] * runtime.world_size
            state.batch, state.batches = state.batch + 1, state.batches + 1
            state.epoch_images, state.seen = state.epoch_images + done, state.seen + done
            metrics.images += images.shape[0]
            if step_now:
                lr = schedule.lr_at(state.iteration, state.epoch)
                in_step = True
                _optimizer_step(optimizer, scaler, lr)
                in_step = False
                values = _checked_values(sums, accumulated, model, state)
                if writer is not None:
                    _log_step(writer, values, lr, size, state.iteration)
                state.iteration += 1
                committed = _commit(state, model)
                sums, accumulated = {}, 0
                metrics.update(values)
                bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}", size=size,
                                img_s=f"{metrics.images_per_s:.1f}")  # fmt: skip
                interrupted = stop is not None and broadcast_flag(stop.requested, runtime)
            bar.update(1)
            tick, metrics.data_s = time.perf_counter(), metrics.data_s + fetched - tick
            metrics.compute_s += tick - fetched
            if interrupted:
                break
    except RuntimeError as error:
        if not any(sign in str(error) for sign in WORKER_DIED) or in_step:
            raise
        _roll_back(state, model, committed)
        raise DataLoaderDied(str(error)) from None
    finally:
        bar.close()
    return metrics, interrupted


def _commit(state: TrainState, model: nn.Module) -> tuple[TrainState, dict]:
    """The counters and the BatchNorm statistics after an optimizer step: forward passes of a
    step not yet taken move the statistics, so a roll-back to the step restores them too."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    return dataclasses.replace(state), buffers


def _roll_back(state: TrainState, model: nn.Module, committed: tuple[TrainState, dict]) -> None:
    saved_state, buffers = committed
    for name, value in dataclasses.asdict(saved_state).items():
        setattr(state, name, value)
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])


def _loss_terms(criterion, raw, targets, state: TrainState) -> dict[str, torch.Tensor]:
    try:
        return criterion(raw, targets, seen=state.seen)
    except ValueError as error:
        raise FloatingPointError(
            f"stopping at iteration {state.iteration} (epoch {state.epoch + 1}, batch "
            f"{state.batch + 1}): {error}. Checkpoints were left as they were; try a lower --lr."
        ) from None


def _optimizer_step(optimizer, scaler: torch.amp.GradScaler, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)  # skips the step when AMP found inf/NaN gradients
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _checked_values(sums: dict, count: int, model: nn.Module, state: TrainState) -> dict:
    """The step's mean loss terms as floats, in one device-to-host copy with a check that the
    weights the step wrote are finite; a non-finite term or weight stops the run."""
    weights = [t for t in unwrap(model).state_dict().values() if t.is_floating_point()]
    finite = torch.stack([t.detach().abs().amax() for t in weights]).isfinite().all()
    stacked = torch.stack([value.float() / count for value in sums.values()])  # [T]
    *values, weights_ok = torch.cat([stacked, finite.float()[None]]).tolist()
    values = dict(zip(sums, values, strict=True))
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad or not weights_ok:
        what = f"non-finite loss {bad}" if bad else "the optimizer step made the weights non-finite"
        raise FloatingPointError(
            f"{what} at iteration {state.iteration} (epoch {state.epoch + 1}). Checkpoints "
            "were left as they were; try a lower --lr."
        )
    return values


def _log_step(writer, values: dict[str, float], lr: float, size: int, step: int) -> None:
    for key, value in values.items():
        writer.add_scalar(f"train/loss_{key}" if key != "num_dropped" else "train/num_dropped",
                          value, step)  # fmt: skip
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/img_size", size, step)


def _items_to_skip(state: TrainState, runtime: Runtime) -> int:
    """This process's items of the epoch already trained (resume by images, not batches)."""
    if state.epoch_images % runtime.world_size:
        raise ValueError(
            f"cannot resume mid-epoch: {state.epoch_images} images of epoch {state.epoch + 1} "
            f"were done, which {runtime.world_size} processes cannot share evenly; resume with "
            "the number of processes the run had"
        )
    return state.epoch_images // runtime.world_size


def fit(config: TrainConfig) -> dict:
    """Train as ``config`` says; returns a summary (best mAP, paths, ``exit_code``)."""
    runtime = setup_runtime(config.device, config.amp)
    with ExitStack() as stack:
        stack.callback(teardown_runtime, runtime)
        config = resolve_demo(config, runtime)
        run_dir, log_dir = Path(config.model_dir) / config.run, Path(config.log_dir) / config.run
        if runtime.is_main:
            check_writable(run_dir, "--model-dir")
            check_writable(log_dir, "--log-dir")
            stack.enter_context(RunLock(run_dir))
            remove_stale_temp_files(run_dir)
        seed_everything(config.seed)
        classes, anchors = resolve_classes(config.classes), resolve_anchors(config.anchors)
        ckpt = checkpoint_to_resume(config, run_dir, classes, anchors, runtime.world_size)
        if ckpt is not None and ckpt["finished"] and ckpt["state"]["epoch"] >= config.epochs:
            log.info("run %s already finished %d epochs: nothing to resume; raise --epochs to "
                     "train further", config.run, ckpt["state"]["epoch"])  # fmt: skip
            return {"finished": True, "best_map": ckpt["state"]["best_map"], "exit_code": 0}
        train_loader, val_loader = build_loaders(config, classes, runtime)
        model, criterion, optimizer, scaler = build_training(config, len(classes), anchors, runtime)
        state = TrainState()
        if ckpt is not None:
            state = TrainState(**restore_training(ckpt, model, optimizer, scaler, config.resume))
        elif config.weights:
            initial_weights(model, config.weights)
        schedule = build_schedule(config, math.ceil(len(train_loader) / config.accum))
        if runtime.is_main:
            report_start(config, schedule)
        ddp = _wrap_ddp(model, runtime)
        writer = None
        if runtime.is_main:
            save_config_json(config, run_dir / "config.json")
            writer = stack.enter_context(SummaryWriter(log_dir, purge_step=state.iteration))
            writer.add_text("config", f"```\n{config_text(config)}\n```", state.iteration)
        stop = stack.enter_context(StopRequest())

        def save(name: str) -> None:
            if runtime.is_main:
                saved = training_checkpoint(
                    model, optimizer, scaler, state, config, classes, anchors
                )
                save_checkpoint(saved, run_dir / name)

        def evaluate_epoch() -> bool:
            """Evaluate the trained epoch; False when a stop cut the evaluation short."""
            res, samples = evaluate(
                ddp, val_loader, anchors, runtime=runtime, class_names=classes,
                conf_threshold=config.conf_threshold, nms_threshold=config.nms_threshold,
                num_vis_images=config.num_vis_images if writer else 0, stop=stop,
            )  # fmt: skip
            if broadcast_flag(stop.requested, runtime):
                return False
            state.eval_pending = False
            if res is not None:
                record_evaluation(state, res, classes, writer, samples)
                if state.best_epoch == state.epoch:
                    save("best.pt")  # before the last.pt that records it as the best
            save("last.pt")
            return True

        def train_epoch() -> bool:
            """Train the rest of the epoch; True when a stop cut it short."""
            train_loader.sampler.set_epoch(state.epoch, start=_items_to_skip(state, runtime))
            whole = state.epoch_images == 0
            try:
                metrics, stopped = train_one_epoch(
                    ddp, criterion, train_loader, optimizer, scaler, state, schedule=schedule,
                    sizes=multiscale_sizes(config), size_every=config.multi_scale_every,
                    seed=config.seed, accum=config.accum, runtime=runtime, writer=writer,
                    stop=stop,
                )  # fmt: skip
            except DataLoaderDied as error:
                save("last.pt")
                saved = f"saved at iteration {state.iteration}" if runtime.is_main else "in last.pt"
                raise ChildProcessError(
                    f"{error}: a data loader worker was killed (out of memory?). The run is "
                    f"{saved}; resume with fewer workers: {resume_command(config)} --workers "
                    f"{max(1, config.workers // 2)}"
                ) from None
            if not stopped:
                state.epoch, state.batch, state.epoch_images = state.epoch + 1, 0, 0
                state.eval_pending = state.epoch % config.eval_every == 0 or (
                    state.epoch == config.epochs
                )
                record_epoch(state, metrics, schedule, writer, whole)
            return stopped

        interrupted = False
        while not interrupted and (state.eval_pending or state.epoch < config.epochs):
            if not state.eval_pending:  # pending: a resumed run that stopped in its evaluation
                interrupted = train_epoch()
                save("last.pt")  # the trained epoch is safe before its evaluation starts
            if not interrupted and state.eval_pending:
                interrupted = not evaluate_epoch()
            if runtime.is_main and not interrupted:
                report_epoch(state, config, run_dir)
    if interrupted:
        log.warning("stopped; checkpoint saved to %s. Resume with:\n  %s", run_dir / "last.pt",
                    resume_command(config))  # fmt: skip
        return {"interrupted": True, "best_map": state.best_map, "exit_code": stop.exit_code}
    if runtime.is_main:
        report_end(state, config, run_dir, log_dir)
    return {"interrupted": False, "finished": True, "best_map": state.best_map, "exit_code": 0}


def _wrap_ddp(model: nn.Module, runtime: Runtime) -> nn.Module:
    if not runtime.distributed:
        return model
    device = runtime.device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
