"""Training data pipeline at 416: the per-image CPU path against the batched device path.

Both read the same generated VOC-like images (200 demo images of 375-500 pixels a side)
through ``VOCDataset`` with the same seeds (so the same drawn parameters):

- cpu: ``build_train_transform(416)`` in the workers (decode, darknet's jitter crop, its float
  corner-aligned resize, flip, HSV distortion) + ``collate_detection``;
- device: ``DeferredTrainTransform`` in the workers (decode, draw the parameters, map the
  boxes) + ``collate_raw`` (the batch padded, uint8); ``augment_batch`` does the pixels on the
  training device.

Measured:

1. the worker's CPU time per image (``time.process_time`` in one process, items then collate
   in batches of 16, best of ``--repeats`` passes after a warm-up), with decode alone (no
   transform, no collate) as the floor;
2. loader images/s through ``build_dataloader`` (batch 16) with each ``--workers`` count: what
   each path hands to the training step (the device path's pixels still to be made there);
3. ``augment_batch`` on this CPU (for ``--augment-on auto``: where the training runs on the CPU,
   the batched path would run in the training process, not in parallel workers).

Torch runs one thread in the main process, as in each worker. Writes
bench/results/data_throughput.{md,json}; the JSON's ``worker_cpu_ms_per_image`` holds
``{"cpu": .., "device": ..}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import machine_line, save_results
from utils.batch_augment import DeferredTrainTransform, augment_batch, collate_raw
from utils.data import VOCDataset
from utils.demo import DEMO_CLASSES, generate_demo_dataset
from utils.loader import build_dataloader, collate_detection
from utils.transforms import build_train_transform

PATHS = ("cpu", "device")
SIZE = 416


def worker_ms(dataset, collate, batch_size: int) -> float:
    """CPU milliseconds per image of the worker's work over the whole dataset: each item with
    its seed, then the collate of each batch (none for the decode floor)."""
    start, count = time.process_time(), len(dataset)
    for first in range(0, count, batch_size):
        items = [dataset[(i, i)] for i in range(first, min(first + batch_size, count))]
        if collate is not None:
            collate(items)
    return 1000 * (time.process_time() - start) / count


def loader_rate(loader) -> float:
    """Images per second over one pass of the loader."""
    start, count = time.perf_counter(), 0
    for images, _, _ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def measure_workers(datasets: dict, args) -> dict[str, float]:
    """Best worker CPU ms per image of each pipeline, pipelines alternating each pass."""
    collates = {"cpu": collate_detection, "device": collate_raw, "decode": None}
    best = dict.fromkeys(datasets, float("inf"))
    for index in range(args.repeats + 1):
        for name, dataset in datasets.items():
            ms = worker_ms(dataset, collates[name], args.batch_size)
            if index > 0:  # the first pass warms the file cache
                best[name] = min(best[name], ms)
    return best


def measure_loaders(datasets: dict, workers: int, args) -> dict[str, float]:
    loaders = {
        name: build_dataloader(datasets[name], batch_size=args.batch_size, shuffle=True, seed=0,
                               workers=workers, pin_memory=False, collate_fn=collate)
        for name, collate in (("cpu", collate_detection), ("device", collate_raw))
    }  # fmt: skip
    best = dict.fromkeys(loaders, 0.0)
    for epoch in range(args.repeats + 1):
        for name, loader in loaders.items():
            loader.sampler.set_epoch(epoch)
            rate = loader_rate(loader)
            if epoch > 0:  # the first pass starts the workers
                best[name] = max(best[name], rate)
    return best


def augment_on_cpu_ms(dataset, batch_size: int, batches: int) -> float:
    """Wall milliseconds per image of ``augment_batch`` at 416 on this CPU, one thread."""
    raws = [collate_raw([dataset[(i, i)] for i in range(b * batch_size, (b + 1) * batch_size)])[0]
            for b in range(batches)]  # fmt: skip
    augment_batch(raws[0][:2], SIZE)  # warm-up
    start = time.perf_counter()
    for raw in raws:
        augment_batch(raw, SIZE)
    return 1000 * (time.perf_counter() - start) / (batches * batch_size)


def write_results(payload: dict) -> str:
    ms, rows, settings = payload["worker_cpu_ms_per_image"], payload["rows"], payload["settings"]
    table = "\n".join(
        f"| {r['workers']} | {r['cpu']:.1f} | {r['device']:.1f} | {r['device'] / r['cpu']:.2f} |"
        for r in rows
    )
    text = (
        f"# Data pipeline: per-image CPU path against the batched device path ({SIZE} x {SIZE})\n\n"
        "cpu = decode + darknet augmentation (jitter .3, flip, HSV .1/1.5/1.5) in the worker "
        "+ collate; device = decode + the drawn parameters and mapped boxes in the worker + "
        "uint8 padded collate, the pixels made by `augment_batch` on the training device.\n\n"
        "| | cpu | device | decode only |\n|---|---|---|---|\n"
        f"| worker CPU ms/image | {ms['cpu']:.2f} | {ms['device']:.2f} "
        f"| {payload['decode_ms_per_image']:.2f} |\n\n"
        f"The device path's worker costs {payload['worker_cost_ratio']:.0%} of the cpu path's.\n\n"
        "| workers | cpu loader img/s | device loader img/s | device / cpu |\n|---|---|---|---|\n"
        f"{table}\n\n"
        f"`augment_batch` on this CPU (one thread): {payload['augment_on_cpu_ms_per_image']:.1f} "
        "ms/image, against the per-image path's worker time above: on a CPU-only run the "
        "per-image path in parallel workers is the faster one (`--augment-on auto` picks it).\n\n"
        f"{settings['images']} demo images of {settings['min_size']}-{settings['max_size']} px, "
        f"batch {settings['batch_size']}, best of {settings['repeats']} passes.\n"
        f"{settings['machine']}\n"
    )
    save_results("data_throughput", text, payload)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {"images": args.images, "min_size": 375, "max_size": 500, "size": SIZE,
                "batch_size": args.batch_size, "repeats": args.repeats}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        root = generate_demo_dataset(folder, num_train=args.images, num_val=1, seed=0,
                                     min_size=375, max_size=500)  # fmt: skip
        transform = build_train_transform(SIZE)
        datasets = {
            name: VOCDataset(root, [("demo", "train")], DEMO_CLASSES, keep_difficult=False,
                             transform=wrapped)
            for name, wrapped in (("cpu", transform), ("device", DeferredTrainTransform(transform)),
                                  ("decode", None))
        }  # fmt: skip
        ms = measure_workers(datasets, args)
        print(f"worker CPU ms/image: {ms}", flush=True)
        rows = []
        for workers in args.workers:
            rows.append({"workers": workers, **measure_loaders(datasets, workers, args)})
            print(f"loader img/s: {rows[-1]}", flush=True)
        on_cpu = augment_on_cpu_ms(datasets["device"], args.batch_size, batches=2)
    settings["machine"] = machine_line("1 per process")
    payload = {
        "worker_cpu_ms_per_image": {name: ms[name] for name in PATHS},
        "worker_cost_ratio": ms["device"] / ms["cpu"],
        "decode_ms_per_image": ms["decode"],
        "images_per_s": {name: {str(r["workers"]): r[name] for r in rows} for name in PATHS},
        "augment_on_cpu_ms_per_image": on_cpu,
        "rows": rows,
        "settings": settings,
    }
    print(write_results(payload))


if __name__ == "__main__":
    main()
