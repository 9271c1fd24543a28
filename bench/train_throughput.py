"""Training images/s at 416 per backbone, split into waiting for data and computing.

Each backbone trains through the engine's own ``train_one_epoch`` (loader -> resize -> forward
under autocast -> loss -> backward -> optimizer step), with the objects ``fit`` builds: the
training loader of ``build_loaders`` (darknet augmentation, seeded sampler, persistent
workers), ``build_train_model`` without pretrained weights, ``YOLOv2Loss``, ``build_optimizer``
and the burn-in learning rate. Multi-scale is off, so every batch is 416 x 416. The data are
demo images of 375-500 px a side (VOC-like sizes), generated into a temporary folder, each read
once; the demo set has 5 classes, so the head is a little smaller than VOC's 20-class one.

One data iterator feeds ``--warmup`` batches, then ``--batches`` timed ones, each part a call
of ``train_one_epoch``, so the timed part starts with the workers running and prefetching, as
in the middle of an epoch. The split is the engine's own: data wait is the time spent waiting
for the next batch, compute is everything else. An optimizer step every batch (``--accum 1``)
ends every batch with a host sync (the NaN check), so CUDA work does not leak into the next
data wait. CPU: fp32, contiguous; CUDA: AMP (bf16, else fp16) and channels_last, as ``fit``
does. Writes bench/results/train_throughput.{md,json}.

    flock /tmp/bench.lock .venv/bin/python bench/train_throughput.py
    flock /tmp/bench.lock .venv/bin/python bench/train_throughput.py --models tiny --batches 3
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import machine_line, save_results, time_training  # noqa: E402
from utils.demo import generate_demo_dataset  # noqa: E402
from yolo.build import build_loaders, build_training  # noqa: E402
from yolo.config import MODELS, TrainConfig  # noqa: E402
from yolo.load import resolve_anchors, resolve_classes  # noqa: E402
from yolo.runtime import Runtime, seed_everything, setup_runtime  # noqa: E402
from yolo.schedule import build_schedule  # noqa: E402

SIZE = 416
MIN_SIDE, MAX_SIDE = 375, 500
# what the flags left unset default to, per device type
DEFAULTS = {
    "cpu": {"batch_size": 8, "workers": 2, "warmup": 2, "batches": 4},
    "cuda": {"batch_size": 64, "workers": 8, "warmup": 5, "batches": 30},
}


def bench_model(name: str, root: Path, runtime: Runtime, args: argparse.Namespace) -> dict:
    config = TrainConfig(
        model=name,
        data_root=str(root),
        train_sets=("demo:train",),
        val_set="demo:val",
        classes=str(root / "demo_classes.txt"),
        epochs=1,
        batch_size=args.batch_size,
        accum=args.accum,
        img_size=SIZE,
        multi_scale=False,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
    )
    seed_everything(config.seed)
    device = runtime.device
    classes, anchors = resolve_classes(config.classes), resolve_anchors(config.anchors)
    train_loader, _ = build_loaders(config, classes, runtime)
    model, criterion, optimizer, scaler = build_training(config, len(classes), anchors, runtime)
    schedule = build_schedule(config, math.ceil(len(train_loader) / config.accum))
    timed = time_training(
        model, criterion, optimizer, scaler, iter(train_loader), runtime=runtime,
        schedule=schedule, size=SIZE, warmup=args.warmup, steps=args.batches, accum=args.accum,
    )  # fmt: skip
    expected = args.batches * args.batch_size
    if timed["images"] != expected:
        raise RuntimeError(f"{name}: timed {timed['images']} images, expected {expected}")
    dtype = runtime.amp_dtype or torch.float32
    return {
        "model": name, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "channels_last": device.type == "cuda", "batch_size": args.batch_size,
        "workers": args.workers, "images_per_s": timed["images_per_s"],
        "data_share": timed["data_share"], "compute_share": 1 - timed["data_share"],
        "ms_per_batch": timed["ms_per_batch"],
    }  # fmt: skip


def write_results(rows: list[dict], settings: dict) -> str:
    machine = machine_line()  # after the measurements
    lines = [
        f"# Training throughput at {SIZE}x{SIZE}",
        "",
        "| model | device | dtype | channels_last | batch | workers | images/s | data wait % "
        "| compute % | ms/batch |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['device']} | {r['dtype']} | {r['channels_last']} | "
            f"{r['batch_size']} | {r['workers']} | {r['images_per_s']:.2f} | "
            f"{100 * r['data_share']:.1f} | {100 * r['compute_share']:.1f} | "
            f"{r['ms_per_batch']:.0f} |"
        )
    lines += [
        "",
        f"yolo.train.train_one_epoch per model: warm-up {settings['warmup']}, timed "
        f"{settings['batches']} batches; accum {settings['accum']} (batches per optimizer "
        f"step); no pretrained weights; multi-scale off; demo images of {MIN_SIDE}-{MAX_SIDE} "
        "px with the darknet training augmentation, each read once. Data wait: time spent "
        "waiting for the next batch. On the CPU the workers share the cores with the training "
        "step, so their cost shows as slower compute more than as data wait.",
        machine,
        "",
    ]
    text = "\n".join(lines)
    payload = {"settings": settings, "machine": machine, "rows": rows}
    save_results("train_throughput", text, payload)
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, help="default 8 on the CPU, 64 on CUDA")
    parser.add_argument("--workers", type=int, help="default 2 on the CPU, 8 on CUDA")
    parser.add_argument("--warmup", type=int, help="untimed batches, default 2 (CPU), 5 (CUDA)")
    parser.add_argument("--batches", type=int, help="timed batches, default 4 (CPU), 30 (CUDA)")
    parser.add_argument("--accum", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    for name in ("batch_size", "warmup", "batches", "accum"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runtime = setup_runtime(args.device, args.amp)
    defaults = DEFAULTS["cuda" if runtime.device.type == "cuda" else "cpu"]
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    settings = {
        key: getattr(args, key) for key in ("batch_size", "workers", "warmup", "batches", "accum")
    }
    settings.update(size=SIZE, min_side=MIN_SIDE, max_side=MAX_SIDE)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        images = (args.warmup + args.batches) * args.batch_size
        root = generate_demo_dataset(
            folder, num_train=images, num_val=1, seed=0, min_size=MIN_SIDE, max_size=MAX_SIDE
        )
        for name in args.models:
            rows.append(bench_model(name, root, runtime, args))
            row = rows[-1]
            print(
                f"{name} {row['device']} {row['dtype']} batch {row['batch_size']}: "
                f"{row['images_per_s']:.2f} img/s, data wait {100 * row['data_share']:.1f}%",
                flush=True,
            )
    print(write_results(rows, settings))


if __name__ == "__main__":
    main()
