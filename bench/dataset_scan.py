"""Scan time of a COCO-train-sized instances JSON and the memory of forked DataLoader workers.

Workload: a synthetic ``instances_train.json`` the size of COCO train2017 (118,287 images,
860,001 boxes, 80 categories with COCO's ids, no segmentation) in a temporary folder, each image
a hard link to one small JPEG. Measures the wall time of ``CocoDataset(...)`` (JSON parse and
scan), the main process's peak RSS, and the memory of 8 forked DataLoader workers holding the
dataset: each worker's USS (private pages, from ``/proc/<pid>/smaps_rollup``) and RSS when idle
(just started) and after every worker served items spread over the whole dataset. The same is
measured for a baseline holding the same records as one Python dict per image (what copy-on-read
costs: reading a Python object writes its reference count, so each worker copies every page it
reads). Writes bench/results/dataset_scan.{md,json}.

    flock /tmp/bench.lock .venv/bin/python bench/dataset_scan.py
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from bench.common import machine_line, save_results  # noqa: E402
from utils.data import CocoDataset  # noqa: E402

COCO_IMAGES, COCO_BOXES = 118_287, 860_001
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_coco(folder: Path, num_images: int, num_boxes: int, seed: int = 0) -> Path:
    """A COCO-shaped instances file and its images (hard links to one 32x24 JPEG)."""
    rng = np.random.default_rng(seed)
    images_dir = folder / "train"
    images_dir.mkdir(parents=True)
    Image.new("RGB", (32, 24), (90, 120, 150)).save(folder / "one.jpg", quality=80)
    widths, heights = rng.integers(320, 641, num_images), rng.integers(240, 481, num_images)
    images = []
    for i in range(num_images):
        name = f"{i + 1:012d}.jpg"
        source = folder / f"one-{i // 60000}.jpg"  # a file takes at most 65000 links here
        if not source.exists():
            shutil.copyfile(folder / "one.jpg", source)
        os.link(source, images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": int(widths[i]),
                       "height": int(heights[i])})  # fmt: skip
    owner = rng.integers(0, num_images, num_boxes)
    x, y = rng.uniform(0, 0.8, num_boxes), rng.uniform(0, 0.8, num_boxes)
    w, h = rng.uniform(0.01, 0.2, num_boxes), rng.uniform(0.01, 0.2, num_boxes)
    cats = rng.choice(COCO_IDS, num_boxes)
    crowd = rng.random(num_boxes) < 0.01
    annotations = []
    for k in range(num_boxes):
        W, H = int(widths[owner[k]]), int(heights[owner[k]])
        bbox = [round(x[k] * W, 2), round(y[k] * H, 2), round(w[k] * W, 2), round(h[k] * H, 2)]
        annotations.append({"id": k + 1, "image_id": int(owner[k]) + 1, "bbox": bbox,
                            "category_id": int(cats[k]), "area": round(bbox[2] * bbox[3], 2),
                            "iscrowd": int(crowd[k])})  # fmt: skip
    categories = [{"id": i, "name": f"class{i}"} for i in COCO_IDS]
    path = folder / "annotations" / "instances_train.json"
    path.parent.mkdir()
    document = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(document))
    return path


def memory_kib(pid: int) -> dict:
    """``{"rss": KiB, "uss": KiB}`` of a process (USS: its private clean + dirty pages)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])
    return {"rss": fields["Rss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


class PerImageDicts(Dataset):
    """Baseline: the same targets held as one Python dict (lists of floats) per image."""

    def __init__(self, dataset: CocoDataset):
        self.items = []
        for i in range(len(dataset)):
            target = dataset.get_target(i)
            self.items.append({"path": dataset.image_path(i), "id": target["image_id"],
                               "boxes": target["boxes"].tolist(),
                               "labels": target["labels"].tolist()})  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        image = Image.open(item["path"]).convert("RGB")
        return image.size, torch.tensor(item["boxes"]).reshape(-1, 4), item["id"]


def _take(item):
    return item


def worker_memory(dataset, workers: int, items_per_worker: int) -> dict:
    """Per-worker USS/RSS idle and after serving ``items_per_worker`` items spread over the set."""
    order = np.random.default_rng(1).permutation(len(dataset))[: workers * items_per_worker]
    loader = DataLoader(dataset, batch_size=64, sampler=order.tolist(), num_workers=workers,
                        collate_fn=_take, persistent_workers=True, prefetch_factor=2)  # fmt: skip
    iterator = iter(loader)
    next(iterator)
    time.sleep(1.0)
    pids = [w.pid for w in iterator._workers]
    idle = [memory_kib(pid) for pid in pids]
    for _ in iterator:
        pass
    busy = [memory_kib(pid) for pid in pids]  # persistent workers: still alive
    del iterator, loader
    growth = [b["uss"] - a["uss"] for a, b in zip(idle, busy, strict=True)]
    return {"uss_idle_mib": np.mean([m["uss"] for m in idle]) / 1024,
            "uss_busy_mib": np.mean([m["uss"] for m in busy]) / 1024,
            "rss_busy_mib": np.mean([m["rss"] for m in busy]) / 1024,
            "uss_growth_mib_mean": float(np.mean(growth)) / 1024,
            "uss_growth_mib_max": float(np.max(growth)) / 1024}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=COCO_IMAGES)
    parser.add_argument("--boxes", type=int, default=COCO_BOXES)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--items-per-worker", type=int, default=2000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    with tempfile.TemporaryDirectory(prefix="dataset_scan-") as tmp:
        start = time.perf_counter()
        path = write_coco(Path(tmp), args.images, args.boxes)
        made = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        start = time.perf_counter()
        dataset = CocoDataset(path)
        scan = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        main_after = memory_kib(os.getpid())["rss"] / 1024
        flat = worker_memory(dataset, args.workers, args.items_per_worker)
        baseline = worker_memory(PerImageDicts(dataset), args.workers, args.items_per_worker)
    rows = [("flat numpy records (CocoDataset)", flat), ("one Python dict per image", baseline)]
    lines = [
        "# COCO-train-sized scan and DataLoader worker memory\n",
        f"{args.images} images, {len(dataset.records.labels)} boxes + "
        f"{len(dataset.records.crowd_labels)} crowd regions; JSON of {size_mb:.0f} MB and "
        f"images written in {made:.1f} s.\n",
        f"- scan (json.load + records): **{scan:.1f} s**; main process peak RSS {peak:.0f} MiB, "
        f"RSS after the scan {main_after:.0f} MiB",
        f"- {args.workers} forked workers, {args.items_per_worker} items each spread over the "
        f"whole set (64 per batch):\n",
        "| records | USS idle MiB | USS after MiB | USS growth mean / max MiB | RSS after MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        lines.append(f"| {name} | {m['uss_idle_mib']:.1f} | {m['uss_busy_mib']:.1f} | "
                     f"{m['uss_growth_mib_mean']:.1f} / {m['uss_growth_mib_max']:.1f} | "
                     f"{m['rss_busy_mib']:.0f} |")  # fmt: skip
    lines += ["", machine_line()]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    payload = {"images": args.images, "boxes": args.boxes, "scan_s": scan, "generate_s": made,
               "main_peak_rss_mib": peak, "main_rss_after_mib": main_after,
               "json_mb": size_mb, "workers": args.workers,
               "items_per_worker": args.items_per_worker,
               "flat": flat, "per_image_dicts": baseline, "machine": machine_line()}  # fmt: skip
    save_results("dataset_scan", text, payload)


if __name__ == "__main__":
    main()
