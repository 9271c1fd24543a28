"""The training schedule as data: learning rate per optimizer step, multi-scale size per batch.

Darknet's schedule (yolov2-voc.cfg, the paper): burn-in ``lr * (i / burn_in) ** 4`` over the
first optimizer steps, then ``lr`` times ``gamma`` at each of the ``lr_steps`` epochs. Darknet's
burn-in is 1000 steps of 64 images, about 4 epochs of VOC; on a dataset of a few hundred
images that would be the whole run (5 steps an epoch: 200 epochs), so the burn-in is at most
``burn_in_epochs`` epochs and at most ``burn_in_share`` of the run's steps: VOC keeps darknet's
1000 steps, a small set gets a few epochs, a short run a tenth of itself.

The loss's prior term (darknet's region layer: while fewer than 12800 images were seen, every
predictor not responsible for an object is pulled to its anchor) is measured the same way: at
most ``prior_share`` of the run's images. VOC keeps darknet's 12800 (0.5% of its 2.6M images);
131 images for 25 epochs (3,275 images) would otherwise spend the whole run under it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

LOW_LR_FRACTION = 0.1  # warn when the lr stays below this share of --lr for most of a run


def learning_rate(
    base_lr: float,
    *,
    iteration: int,
    epoch: int,
    burn_in: int,
    lr_steps: tuple[int, ...],
    gamma: float,
) -> float:
    """Darknet's burn-in ``lr * (i / burn_in) ** 4`` for the first optimizer steps, then steps.

    ``iteration`` counts optimizer steps (darknet's batches of 64 images); ``lr_steps`` are
    epochs, as the paper states its schedule (/10 at epochs 60 and 90).
    """
    factor = gamma ** sum(epoch >= step for step in lr_steps)
    if iteration < burn_in:
        factor *= (iteration / burn_in) ** 4
    return base_lr * factor


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every optimizer step of a run (``lr_at``) and its description."""

    lr: float
    burn_in: int  # optimizer steps, after the caps in epochs and in a share of the run
    lr_steps: tuple[int, ...]
    gamma: float
    epochs: int
    steps_per_epoch: int
    prior_images: int = 12800  # images seen before the loss's prior term stops

    def lr_at(self, iteration: int, epoch: int) -> float:
        return learning_rate(
            self.lr,
            iteration=iteration,
            epoch=epoch,
            burn_in=self.burn_in,
            lr_steps=self.lr_steps,
            gamma=self.gamma,
        )

    def low_lr_share(self) -> float:
        """Share of the run's steps whose lr is below ``LOW_LR_FRACTION`` of the peak."""
        total = self.epochs * self.steps_per_epoch
        low = sum(
            self.lr_at(epoch * self.steps_per_epoch + step, epoch) < LOW_LR_FRACTION * self.lr
            for epoch in range(self.epochs)
            for step in range(self.steps_per_epoch)
        )
        return low / max(total, 1)

    def describe(self) -> str:
        """Two lines for the log: steps, burn-in, the prior term's span and the lr at each step."""
        lrs = ", ".join(
            f"{self.lr * self.gamma ** (i + 1):.2g} at epoch {step}"
            for i, step in enumerate(self.lr_steps)
        )
        return (
            f"schedule: {self.epochs} epochs of {self.steps_per_epoch} optimizer steps; "
            f"burn-in {self.burn_in} steps ({self.burn_in / self.steps_per_epoch:.1f} epochs); "
            f"prior term for the first {self.prior_images} images\n"
            f"learning rate: {self.lr:.2g} after the burn-in" + (f", then {lrs}" if lrs else "")
        )


def build_schedule(config, steps_per_epoch: int, images_per_epoch: int | None = None) -> Schedule:
    """The schedule of a :class:`yolo.config.TrainConfig` for ``steps_per_epoch`` optimizer
    steps and ``images_per_epoch`` images (all processes) an epoch: the burn-in capped at
    ``config.burn_in_epochs`` epochs and ``config.burn_in_share`` of the run's steps, the prior
    term at ``config.prior_share`` of its images (rounded up: a share of a run is never 0)."""
    steps_per_epoch = max(steps_per_epoch, 1)
    run_steps = config.epochs * steps_per_epoch
    burn_in = min(
        config.burn_in,
        config.burn_in_epochs * steps_per_epoch,
        math.ceil(config.burn_in_share * run_steps),
    )
    prior = config.prior_images
    if images_per_epoch is not None:
        prior = min(prior, math.ceil(config.prior_share * config.epochs * images_per_epoch))
    return Schedule(
        lr=config.lr,
        burn_in=burn_in,
        lr_steps=tuple(config.lr_steps),
        gamma=config.lr_gamma,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        prior_images=prior,
    )


def multiscale_sizes(config) -> tuple[int, ...]:
    """The sizes multi-scale training draws from: ``min_size..max_size`` in steps of 32, or
    ``img_size`` alone without multi-scale."""
    if not config.multi_scale:
        return (config.img_size,)
    return tuple(range(config.min_size, config.max_size + 1, 32))


def train_size(batches: int, *, seed: int, sizes: tuple[int, ...], every: int) -> int:
    """Multi-scale size of batch number ``batches``: one random size per block of ``every``,
    drawn from (seed, block) alone, so every rank and a resumed run agree."""
    return random.Random(seed * 1_000_003 + batches // every).choice(sizes)
