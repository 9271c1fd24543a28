"""One training epoch: :func:`train_one_epoch` and the run's counters (:class:`TrainState`).

A step's loss terms and the weights it wrote are checked finite before anything is logged or
saved; a data loader worker that dies rolls the counters and BatchNorm statistics back to the
last optimizer step, where the weights are.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.batch_augment import RawBatch, augment_batch
from utils.transforms import resize_batch
from yolo.ema import WeightEMA
from yolo.runtime import Runtime, StopRequest, broadcast_flag, unwrap
from yolo.schedule import Schedule, train_size

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
    # the epoch in progress: its optimizer steps' loss terms summed, so that an epoch resumed
    # midway reports the mean of all its steps, as the uninterrupted epoch does
    loss_sums: dict[str, float] = field(default_factory=dict)
    loss_steps: int = 0


class DataLoaderDied(RuntimeError):
    """A data loader worker died (usually killed for memory); the state is the last step's."""


class MetricLogger:
    """Running means of the loss terms and the time split of an epoch (torchvision's
    ``MetricLogger`` idea): ``update`` per optimizer step, ``means()`` at the end."""

    def __init__(self, sums: dict[str, float] | None = None, steps: int = 0) -> None:
        self.sums: dict[str, float] = defaultdict(float, sums or {})  # from a resumed epoch
        self.steps = steps
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
    ema: WeightEMA | None = None,
) -> tuple[MetricLogger, bool]:
    """One epoch (or its rest, after a mid-epoch resume) -> (metrics, interrupted).

    Steps the optimizer every ``accum`` batches; the batch is resized to a multi-scale size
    drawn from ``sizes`` every ``size_every`` batches; ``ema`` averages the weights after every
    optimizer step (once they are checked finite). Stops early at an optimizer step when
    ``stop`` is requested. A dead data loader worker raises :class:`DataLoaderDied` with
    ``state`` set back to the last optimizer step, where the weights are.
    """
    model.train()
    metrics, sums, accumulated = MetricLogger(state.loss_sums, state.loss_steps), {}, 0
    committed, interrupted, in_step = _commit(state, model), False, False
    bar = tqdm(total=len(loader), desc=f"epoch {state.epoch + 1}", disable=not runtime.is_main,
               dynamic_ncols=True, leave=False)  # fmt: skip
    tick = time.perf_counter()
    try:
        for index, (images, targets, _) in enumerate(loader):
            fetched = time.perf_counter()
            size = train_size(state.batches, seed=seed, sizes=sizes, every=size_every)
            if isinstance(images, RawBatch):  # --augment-on device: made here, at this size
                images = runtime.to_device(augment_batch(images.to(runtime.device), size))
            else:
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
                if ema is not None:
                    ema.update(model)
                if writer is not None:
                    _log_step(writer, values, lr, size, state.iteration)
                state.iteration += 1
                metrics.update(values)
                state.loss_sums, state.loss_steps = dict(metrics.sums), metrics.steps
                committed = _commit(state, model)
                sums, accumulated = {}, 0
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
