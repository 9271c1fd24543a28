"""Forward speed, parameter count and GFLOPs of every YOLOv2 backbone at 416.

Runs fp32 on the CPU, and fp32 plus fp16/bf16 autocast with channels_last where CUDA is
present. GFLOPs are torch.utils.flop_counter's count: 2 FLOPs per multiply-add of the convs,
per image. Writes bench/results/model_speed.{md,json}.

    flock /tmp/bench.lock .venv/bin/python bench/model_speed.py
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import machine_line, save_results, time_calls  # noqa: E402
from yolo.model import MODEL_NAMES, build_model  # noqa: E402


def count_gflops(model: torch.nn.Module, size: int) -> float:
    """GFLOPs of one forward of one image (2 FLOPs per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def images_per_second(
    model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype, min_iters: int, min_s: float
) -> float:
    """Timed forwards (after two warm-up calls) until both ``min_iters`` and ``min_s`` are met."""
    autocast = torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        iters, seconds = time_calls(
            lambda: model(images), images.device, min_iters=min_iters, min_s=min_s
        )
    return iters * images.shape[0] / seconds


def settings(cuda: bool) -> list[tuple[str, torch.dtype, bool]]:
    """(device, autocast dtype, channels_last) combinations to time."""
    rows = [("cpu", torch.float32, False)]
    if cuda:
        rows += [
            ("cuda", torch.float32, False),
            ("cuda", torch.float16, True),
            ("cuda", torch.bfloat16, True),
        ]
    return rows


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    model = build_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    gflops = count_gflops(model, args.size)
    rows = []
    for device_name, dtype, channels_last in settings(torch.cuda.is_available()):
        device = torch.device(device_name)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(device, memory_format=fmt)
        for batch_size in args.batch_sizes:
            images = torch.rand(batch_size, 3, args.size, args.size, device=device)
            images = images.contiguous(memory_format=fmt)
            min_iters = args.iters if device.type == "cpu" else 10 * args.iters
            speed = images_per_second(model, images, dtype, min_iters, args.min_seconds)
            rows.append({
                "model": name, "params": params, "gflops": gflops, "device": device_name,
                "dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last,
                "batch_size": batch_size, "images_per_s": speed,
                "ms_per_batch": 1000 * batch_size / speed,
            })  # fmt: skip
            print(f"{name} {device_name} {rows[-1]['dtype']} batch {batch_size}: {speed:.2f} img/s")
    return rows


def write_results(rows: list[dict], size: int) -> str:
    machine = machine_line()  # after the measurements
    lines = [
        f"# Model forward speed at {size}x{size}",
        "",
        "| model | params (M) | GFLOPs/img | device | dtype | channels_last | batch | "
        "images/s | ms/batch |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {r['device']} | "
            f"{r['dtype']} | {r['channels_last']} | {r['batch_size']} | "
            f"{r['images_per_s']:.2f} | {r['ms_per_batch']:.1f} |"
        )
    lines += [
        "",
        "GFLOPs: torch.utils.flop_counter, 2 FLOPs per multiply-add, one image.",
        machine,
        "",
    ]
    text = "\n".join(lines)
    meta = {"size": size, "machine": machine, "rows": rows}
    save_results("model_speed", text, meta)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--iters", type=int, default=3, help="timed forwards at least (CPU)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds at least")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [row for name in args.models for row in bench_model(name, args)]
    print(write_results(rows, args.size))


if __name__ == "__main__":
    main()
