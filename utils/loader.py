"""Sampling, batching and loading for :class:`utils.data.VOCDataset`.

``SeededSampler`` yields ``(index, item_seed)`` pairs (so augmentation depends only on the
seed, the epoch and the index, in any worker), ``collate_detection`` makes the padded target
tensor and the per-image metadata, ``build_dataloader`` puts them together.

A batch is the same bits whatever ``workers`` is: torch runs a worker process on one CPU thread,
and some CPU kernels the transforms use (``F.interpolate``'s bilinear among them) round the last
bit differently when they split their work over more threads. So without workers the batches are
made on one thread too (the training and evaluation between them keep the process's count).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.boxes import xyxy_to_cxcywh
from utils.records import dataset_image_ids

__all__ = [
    "SeededSampler",
    "build_dataloader",
    "collate_detection",
    "collate_targets",
    "data_record",
    "seed_worker",
]


def _mix(*values: int) -> int:
    """A 63-bit seed from integers: stable across processes, platforms and Python versions."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def data_record(dataset, classes: Sequence[str]) -> dict:
    """What a run trains or evaluates on, for its checkpoint: ``{"images": N, "digest":
    "sha256:<hex>"}``, the digest over the dataset's image ids in order and the class list, so
    an image added, removed, renamed or reordered (which changes every later item's index, so
    the shuffle) shows on resume. Ids come from ``records`` (``VOCDataset``'s per-image records
    or the flat records' ``image_ids`` array: :func:`utils.records.dataset_image_ids`)."""
    ids = [str(image_id) for image_id in dataset_image_ids(dataset)]
    digest = hashlib.sha256()
    for part in ("classes", *classes, "images", *ids):
        digest.update(part.encode() + b"\0")
    return {"images": len(ids), "digest": f"sha256:{digest.hexdigest()}"}


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)`` pairs for ``VOCDataset``; resumable, shardable.

    The order is a permutation drawn from (seed, epoch) when ``shuffle``, else ``0..n-1``;
    ``item_seed`` is derived from (seed, epoch, index). With ``num_replicas > 1`` it shards as
    ``DistributedSampler`` does: the order is padded by repetition (or, with ``drop_last``,
    truncated) to a multiple of ``num_replicas`` and rank ``r`` takes every ``num_replicas``-th
    item from ``r``. ``set_epoch(epoch, start)`` picks the epoch and skips the first ``start``
    items of this rank's order (to resume mid-epoch: ``start`` counts items, not batches).
    ``len()`` is the number of items this rank yields from ``start``.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(f"drop_last with {dataset_len} items leaves none for some ranks")
        self.dataset_len, self.shuffle, self.seed = dataset_len, shuffle, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        if drop_last:
            self.num_samples = dataset_len // num_replicas
        else:
            self.num_samples = -(-dataset_len // num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(
                f"cannot start epoch {epoch} at item {start} of this rank: its share of the "
                f"{self.dataset_len} items is {self.num_samples} (did the data change?)"
            )
        self.epoch, self.start = epoch, start

    def rank_indices(self) -> list[int]:
        """This rank's whole order for the current epoch (before ``start``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.num_replicas
        while len(order) < total:
            order += order[: total - len(order)]
        return order[:total][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.rank_indices()[self.start :]:
            yield index, _mix(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples - self.start


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]):
    """List of (image ``[3, H, W]``, target) -> (images, targets, metas).

    ``images`` ``[N, 3, H, W]`` float32; ``targets`` and ``metas`` as :func:`collate_targets`.
    """
    images = torch.stack([image for image, _ in batch]).to(torch.float32)  # [N, 3, H, W]
    return (images, *collate_targets([target for _, target in batch]))


def collate_targets(batch: Sequence[dict]) -> tuple[torch.Tensor, list[dict]]:
    """List of target dicts -> (targets, metas).

    ``targets`` ``[N, G, 5]`` float32 rows ``(class, cx, cy, w, h)`` normalised, padding rows
    ``(-1, 0, 0, 0, 0)``, ``G`` the most boxes of an image in the batch (at least 1); ``metas``
    one dict per image with ``"image_id"``, ``"orig_size"`` (height, width), ``"unreadable"``
    (bool: the image could not be read and is a grey stand-in, see
    ``VOCDataset(keep_unreadable=True)``) and ``"gt"`` ``[G_i, 6]`` float32 ``(x1, y1, x2, y2,
    class, difficult)`` normalised (the evaluation ground truth); COCO's extras for the
    evaluator: ``"areas"`` ``[G_i]`` pixels² or None, ``"crowd_boxes"`` ``[K_i, 4]`` normalised
    xyxy and ``"crowd_labels"`` ``[K_i]`` (empty outside COCO).
    """
    most = max([1] + [len(target["labels"]) for target in batch])
    targets = torch.zeros(len(batch), most, 5, dtype=torch.float32)
    targets[..., 0] = -1.0
    metas = []
    for row, target in enumerate(batch):
        boxes = target["boxes"].to(torch.float32).reshape(-1, 4)  # [G_i, 4]
        labels = target["labels"].to(torch.float32)
        targets[row, : len(labels), 0] = labels
        targets[row, : len(labels), 1:] = xyxy_to_cxcywh(boxes)
        gt = torch.cat([boxes, labels[:, None], target["difficult"].to(torch.float32)[:, None]], 1)
        metas.append(
            {
                "image_id": target["image_id"],
                "orig_size": target["orig_size"],
                "unreadable": bool(target.get("unreadable", False)),
                "gt": gt,
                "areas": target.get("areas"),  # COCO's "area" [G_i] pixels², else None
                "crowd_boxes": target.get("crowd_boxes", torch.zeros(0, 4)),
                "crowd_labels": target.get("crowd_labels", torch.zeros(0, dtype=torch.int64)),
            }
        )
    return targets, metas


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed Python's and numpy's generators from torch's worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run the block on one torch CPU thread, as in a DataLoader worker; then restore the count.

    ``torch.set_num_threads`` is process-wide: only for work that no other thread runs meanwhile.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _OneThreadIterator:
    """Wraps a single-process DataLoader iterator: each batch is loaded on one torch thread."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        with _one_torch_thread():
            return next(self._iterator)

    def __len__(self) -> int:
        return len(self._iterator)


class _DetectionLoader(DataLoader):
    """A DataLoader whose batches do not depend on ``num_workers`` (see the module docstring)."""

    def __iter__(self):
        iterator = super().__iter__()
        return iterator if self.num_workers > 0 else _OneThreadIterator(iterator)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int,
    drop_last: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool | None = None,
    collate_fn=collate_detection,
) -> DataLoader:
    """A DataLoader over ``SeededSampler`` pairs with ``collate_fn`` (``collate_detection``, or
    ``utils.batch_augment.collate_raw`` for a dataset whose transform leaves the pixels to the
    training device).

    ``loader.sampler`` is the ``SeededSampler`` (call ``loader.sampler.set_epoch(epoch, start)``
    before each epoch). ``drop_last`` drops the last incomplete batch and truncates the shards.
    Workers persist across epochs; memory is pinned by default when CUDA is available. Without
    workers each batch is made on one torch thread, as a worker makes it: the same bits. So
    ``workers`` is capped at the CPUs this process may use (more only compete for them).
    """
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    workers = min(workers, usable_cpus())
    sampler = SeededSampler(
        len(dataset),
        shuffle=shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=drop_last,
    )
    return _DetectionLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
