"""Training data pipeline throughput at 416 against the floor of a plain PIL decode + resize.

Both pipelines read the same generated VOC-like images (300 demo images of 375-500 pixels a
side) through ``build_dataloader`` (seeded sampler, ``collate_detection``, batch 16) with 0, 1
and 2 workers:

- train: ``VOCDataset`` + ``build_train_transform(416)`` (decode, darknet's jitter crop, its
  float corner-aligned resize, flip, HSV distortion) + collate;
- floor: PIL decode, ``convert("RGB")``, PIL bilinear resize to 416 x 416, to float + collate.

Each configuration runs one warm-up epoch, then the pipelines alternate for ``--repeats``
epochs and the best epoch of each counts (the machine is shared). Torch runs one thread in the
main process, as it does in each worker, so images/s per worker compares like with like.
Writes bench/results/data_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from bench.common import machine_line, save_results
from utils.data import VOCDataset
from utils.demo import DEMO_CLASSES, generate_demo_dataset
from utils.loader import build_dataloader
from utils.transforms import build_train_transform


class FloorDataset(Dataset):
    """PIL decode + resize to ``size`` x ``size`` -> float [3, S, S]; an empty target."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        with Image.open(self.paths[index]) as image:
            resized = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        target = {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "difficult": torch.zeros(0, dtype=torch.bool),
            "image_id": self.paths[index].stem,
            "orig_size": (resized.height, resized.width),
        }
        return TF.pil_to_tensor(resized).float().div_(255.0), target


def epoch_rate(loader) -> float:
    """Images per second over one pass of the loader."""
    start, count = time.perf_counter(), 0
    for images, _, _ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def measure(datasets: dict, workers: int, batch_size: int, repeats: int) -> dict[str, float]:
    loaders = {
        name: build_dataloader(
            dataset, batch_size=batch_size, shuffle=True, seed=0, workers=workers, pin_memory=False
        )
        for name, dataset in datasets.items()
    }
    best = dict.fromkeys(loaders, 0.0)
    for epoch in range(repeats + 1):
        for name, loader in loaders.items():
            loader.sampler.set_epoch(epoch)
            rate = epoch_rate(loader)
            if epoch > 0:  # the first pass starts the workers and warms the file cache
                best[name] = max(best[name], rate)
    return best


def write_results(rows: list[dict], settings: dict) -> str:
    header = (
        "| workers | floor img/s | train img/s | floor img/s/worker | train img/s/worker "
        "| train / floor |\n|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['workers']} | {r['floor']:.1f} | {r['train']:.1f} | {r['floor_per_worker']:.1f} "
        f"| {r['train_per_worker']:.1f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    text = (
        "# Data pipeline throughput (416 x 416)\n\n"
        "train = decode + darknet augmentation (jitter .3, flip, HSV .1/1.5/1.5) + collate; "
        "floor = PIL decode + PIL bilinear resize + collate, same DataLoader.\n\n"
        + header
        + "\n".join(lines)
        + f"\n\n{settings['images']} demo images of {settings['min_size']}-{settings['max_size']} "
        f"px, batch {settings['batch_size']}, best of {settings['repeats']} epochs.\n"
        f"{settings['machine']}\n"
    )
    payload = {"settings": settings, "rows": rows}
    save_results("data_throughput", text, payload)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {
        "images": args.images,
        "min_size": 375,
        "max_size": 500,
        "size": 416,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory() as folder:
        root = generate_demo_dataset(
            folder, num_train=args.images, num_val=1, seed=0, min_size=375, max_size=500
        )
        train = VOCDataset(
            root,
            [("demo", "train")],
            DEMO_CLASSES,
            keep_difficult=False,
            transform=build_train_transform(416),
        )
        floor = FloorDataset([record.image_path for record in train.records], 416)
        rows = []
        for workers in args.workers:
            best = measure({"floor": floor, "train": train}, workers, args.batch_size, args.repeats)
            per = max(workers, 1)
            rows.append(
                {
                    "workers": workers,
                    "floor": best["floor"],
                    "train": best["train"],
                    "floor_per_worker": best["floor"] / per,
                    "train_per_worker": best["train"] / per,
                    "ratio": best["train"] / best["floor"],
                }
            )
            print(
                f"workers={workers}: floor {best['floor']:.1f} img/s, train "
                f"{best['train']:.1f} img/s",
                flush=True,
            )
    settings["machine"] = machine_line("1 per process")
    print(write_results(rows, settings))


if __name__ == "__main__":
    main()
