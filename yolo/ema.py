"""Exponential moving average of a model's weights and BatchNorm buffers, the model a run
evaluates and saves as ``best.pt`` when ``--ema`` is on.

Built on ``torch.optim.swa_utils.AveragedModel`` (``use_buffers=True``: the BatchNorm running
statistics are averaged too). After optimizer step ``k`` (``k`` = 0, 1, ...)::

    ema_0 = w_0;  ema_k = d_k * ema_(k-1) + (1 - d_k) * w_k,  d_k = decay * (1 - exp(-k / ramp))

the ramp of YOLOX and ultralytics (decay 0.9998, ramp 2000 steps). On a run of a few hundred
steps that ramp never gets past ``d`` = 0.2, i.e. no averaging at all, and a decay of 0.9998
(a window of 5000 steps) would freeze the average early in the run. So both are bounded by
the run's length (:func:`ema_terms`): the ramp lasts at most ``EMA_RAMP_SHARE`` of the run's
optimizer steps and the averaging window ``1 / (1 - decay)`` at most ``--ema-share`` of them
(a 1200-step run averages over its last 60 steps, 3 epochs of a 160-image set: a window of a
tenth lagged behind the last learning-rate step, docs/training.md). YOLOX's 0.9998 applies from
100,000 steps; darknet's VOC schedule (41,440 steps) averages over its last 2,072 (8 epochs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from yolo.runtime import unwrap

EMA_RAMP = 2000  # optimizer steps of the decay's ramp on a long run (YOLOX, ultralytics)
EMA_RAMP_SHARE = 0.1  # the ramp lasts at most this share of the run's steps


def ema_terms(decay: float, run_steps: int, share: float) -> tuple[float, float]:
    """``(decay, ramp)`` for a run of ``run_steps`` optimizer steps: ``decay`` bounded so that
    the window ``1 / (1 - decay)`` lasts at most ``share`` of the run, :data:`EMA_RAMP` so that
    the ramp lasts at most :data:`EMA_RAMP_SHARE` of it (each at least one step)."""
    window = max(share * run_steps, 1.0)
    ramp = max(EMA_RAMP_SHARE * run_steps, 1.0)
    return min(decay, 1.0 - 1.0 / window), min(float(EMA_RAMP), ramp)


def ramped_decay(updates: int, decay: float, ramp: float) -> float:
    """The decay applied at update number ``updates`` (0 for the first: a copy)."""
    return decay * (1.0 - math.exp(-updates / ramp))


class WeightEMA:
    """The EMA of ``model`` (unwrapped from DDP), on every rank. The weights are the same on
    every rank after a step, the BatchNorm running statistics are not (each rank's last forward
    pass moved its own; DDP copies rank 0's at the next forward): so the averaged statistics
    are rank 0's, broadcast after each update, and every rank evaluates the same model. Its
    tensors keep the model's dtype: float32 under AMP, which casts only inside the forward."""

    def __init__(self, model: nn.Module, *, decay: float, ramp: float) -> None:
        self.decay, self.ramp, self.updates = decay, ramp, 0
        self.averaged = AveragedModel(unwrap(model), multi_avg_fn=self._average, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The averaged model (evaluate and save this)."""
        return self.averaged.module

    @torch.no_grad()
    def _average(self, averaged: list, current: list, _count) -> None:
        """``AveragedModel``'s ``multi_avg_fn``: one dtype and device group at a time."""
        if averaged[0].is_floating_point():
            weight = 1.0 - ramped_decay(self.updates, self.decay, self.ramp)
            torch._foreach_lerp_(averaged, current, weight)
        else:  # BatchNorm's num_batches_tracked: a counter, not a weight
            for mine, theirs in zip(averaged, current, strict=True):
                mine.copy_(theirs)

    def update(self, model: nn.Module) -> None:
        """Fold the weights of ``model`` after an optimizer step into the average."""
        self.averaged.update_parameters(unwrap(model))
        self.updates += 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _broadcast_float_buffers(self.module)

    def state_dict(self) -> dict:
        """What a checkpoint holds: the averaged weights and buffers, and the update count."""
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self.averaged.n_averaged.fill_(self.updates)


@torch.no_grad()
def _broadcast_float_buffers(module: nn.Module) -> None:
    """Rank 0's floating-point buffers to every rank, in one collective."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.broadcast(flat, src=0)
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        buffer.copy_(value.view_as(buffer))
