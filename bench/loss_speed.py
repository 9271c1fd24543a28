"""Loss and postprocess cost beside the ResNet18 model's forward+backward.

Times forward+backward of YOLOv2Loss ("global" and "darknet" assignment) at 416 (13x13) and
608 (19x19), batch 1, 8 and 16, 20 classes, about 2.4 ground truths per image (Poisson), with
its peak memory; the ResNet18 YOLOv2 model's forward+backward at the same batch and size; and
postprocess of a batch of 16 at 416, beside one batched_nms over all its candidates and a
per-image scheme without a threshold. Writes bench/results/loss_speed.{md,json}.

Peak memory is the largest total of bytes the CPU allocator holds during one forward+backward
beyond what it held before (the raw output and targets), summed from torch.profiler's memory
events in time order; it includes the gradient of the raw output.

    flock /tmp/bench.lock .venv/bin/python bench/loss_speed.py
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own chatter

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torchvision.ops import batched_nms  # noqa: E402

from bench.common import machine_line, save_results  # noqa: E402
from utils.anchors import default_anchors  # noqa: E402
from yolo.converter import decode  # noqa: E402
from yolo.loss import YOLOv2Loss  # noqa: E402
from yolo.nms import postprocess  # noqa: E402

NUM_CLASSES = 20


def anchors() -> torch.Tensor:
    return default_anchors()


def random_targets(batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """``[N, G, 5]`` with Poisson(2.4) ground truths per image (at least one), padded."""
    counts = torch.poisson(torch.full((batch_size,), 2.4), generator=gen).long().clamp(min=1)
    targets = torch.full((batch_size, int(counts.max()), 5), -1.0)
    for b, count in enumerate(counts.tolist()):
        targets[b, :count, 0] = torch.randint(0, NUM_CLASSES, (count,), generator=gen).float()
        targets[b, :count, 1:3] = torch.rand(count, 2, generator=gen)
        targets[b, :count, 3:5] = 0.03 + 0.7 * torch.rand(count, 2, generator=gen)
    return targets


def median_ms(step: Callable[[], object], min_iters: int, min_seconds: float) -> float:
    """Median wall time of ``step`` in ms, after one warm-up call."""
    step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return 1000 * statistics.median(times)


def peak_mib(step: Callable[[], object]) -> float:
    """Peak extra CPU allocation during ``step`` in MiB: the running total of the profiler's
    allocation (+) and free (-) events, in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def loss_step(criterion: YOLOv2Loss, raw: torch.Tensor, targets: torch.Tensor):
    def step() -> None:
        raw.grad = None
        criterion(raw, targets, seen=0)["total"].backward()

    return step


def model_step(model: torch.nn.Module, images: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(images).sum().backward()

    return step


def bench_loss(grid: int, batch_size: int, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(grid * 100 + batch_size)
    raw = torch.randn(batch_size, 5 * (5 + NUM_CLASSES), grid, grid, generator=gen)
    raw.requires_grad_()
    targets = random_targets(batch_size, gen)
    row = {"grid": grid, "size": 32 * grid, "batch_size": batch_size}
    for mode in ("global", "darknet"):
        step = loss_step(YOLOv2Loss(anchors(), NUM_CLASSES, assignment=mode), raw, targets)
        row[f"loss_{mode}_ms"] = median_ms(step, args.loss_iters, args.min_seconds)
        row[f"loss_{mode}_peak_mib"] = peak_mib(step)
    row["ground_truths"] = int((targets[..., 0] >= 0).sum())
    return row


def bench_model(row: dict, model: torch.nn.Module, args: argparse.Namespace) -> None:
    images = torch.rand(row["batch_size"], 3, row["size"], row["size"])
    row["model_ms"] = median_ms(model_step(model, images), args.model_iters, 0.0)
    row["loss_percent_of_model"] = 100 * row["loss_global_ms"] / row["model_ms"]


def trained_like_head(batch_size: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    """A raw head shaped like a trained detector's: background objectness around
    sigmoid(-7), and around each of ~2.4 objects per image a confident prediction of the right
    class in its cell and weaker ones in the 3x3 neighbourhood."""
    num_anchors, per_anchor = len(default_anchors()), 5 + NUM_CLASSES
    raw = torch.randn(batch_size, num_anchors, per_anchor, grid, grid, generator=gen)
    raw[:, :, 2:4] *= 0.5
    raw[:, :, 4] = raw[:, :, 4] * 1.5 - 7.0
    raw[:, :, 5:] *= 1.5
    targets = random_targets(batch_size, gen)
    for b, g in (targets[..., 0] >= 0).nonzero().tolist():
        cls, cx, cy = int(targets[b, g, 0]), targets[b, g, 1].item(), targets[b, g, 2].item()
        col, row = min(int(cx * grid), grid - 1), min(int(cy * grid), grid - 1)
        rows = slice(max(row - 1, 0), row + 2)
        cols = slice(max(col - 1, 0), col + 2)
        near = raw[b, :, 4, rows, cols]
        raw[b, :, 4, rows, cols] = near.normal_(-3.0, 1.5, generator=gen)
        raw[b, :, 5 + cls, rows, cols] += 4.0
        raw[b, 0, 4, row, col] = 3.0
        raw[b, 0, 5 + cls, row, col] += 2.0
    return raw.reshape(batch_size, num_anchors * per_anchor, grid, grid)


def postprocess_all_candidates(raw: torch.Tensor, anchors: torch.Tensor) -> list:
    """postprocess's NMS as one ``batched_nms`` over all candidates, without its pass over each
    image's best candidates first (same kept boxes), for comparison."""
    boxes, objectness, class_probs = decode(raw, anchors)
    scores = objectness[..., None] * class_probs  # [N, P, C]
    image, pred, label = (scores > 0.005).nonzero(as_tuple=True)
    candidate_boxes = boxes[image, pred].double()  # [K, 4] unclipped
    candidate_scores = scores[image, pred, label].double()
    groups = image * NUM_CLASSES + label
    kept = batched_nms(candidate_boxes - candidate_boxes.min(), candidate_scores, groups, 0.45)
    return [kept[image[kept] == b][:100] for b in range(raw.shape[0])]


def postprocess_seed_style(raw: torch.Tensor, anchors: torch.Tensor) -> list:
    """A per-image scheme, for timing only (not the same output): per image, every prediction
    with its best class, ``batched_nms`` over all of them, no threshold."""
    boxes, objectness, class_probs = decode(raw, anchors)
    results = []
    for b in range(raw.shape[0]):
        best_prob, best_class = class_probs[b].max(dim=1)
        results.append(batched_nms(boxes[b], objectness[b] * best_prob, best_class, 0.45))
    return results


def bench_postprocess(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    heads = {
        "trained-like": trained_like_head(16, 13, gen),
        "untrained (N(0,1))": torch.randn(16, 125, 13, 13, generator=gen),
    }
    rows = []
    for name, raw in heads.items():
        _, objectness, class_probs = decode(raw, anchors())
        candidates = int(((objectness[..., None] * class_probs) > 0.005).sum())
        detections = sum(len(d) for d in postprocess(raw, anchors()))
        iters = args.post_iters if name == "trained-like" else 2
        rows.append({
            "head": name, "batch_size": 16, "size": 416,
            "candidates_per_image": candidates / 16, "detections_per_image": detections / 16,
            "postprocess_ms": median_ms(lambda r=raw: postprocess(r, anchors()), iters, 0.5),
            "all_candidates_ms": median_ms(
                lambda r=raw: postprocess_all_candidates(r, anchors()), iters, 0.5
            ),
            "seed_style_ms": median_ms(
                lambda r=raw: postprocess_seed_style(r, anchors()), iters, 0.5
            ),
        })  # fmt: skip
        print(rows[-1])
    return rows


def loss_table(rows: list[dict]) -> list[str]:
    lines = [
        "| size | grid | batch | GTs | loss global ms | loss darknet ms | peak MiB global | "
        "peak MiB darknet | ResNet18 fwd+bwd ms | loss / model |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['grid']}x{r['grid']} | {r['batch_size']} | "
            f"{r['ground_truths']} | {r['loss_global_ms']:.2f} | {r['loss_darknet_ms']:.2f} | "
            f"{r['loss_global_peak_mib']:.2f} | {r['loss_darknet_peak_mib']:.2f} | "
            f"{r['model_ms']:.0f} | {r['loss_percent_of_model']:.3f}% |"
        )
    return lines


def scaling_lines(rows: list[dict]) -> list[str]:
    """608 over 416 for each batch size, against S*S (361/169 = 2.14)."""
    by_key = {(r["grid"], r["batch_size"]): r for r in rows}
    lines = []
    for batch_size in sorted({r["batch_size"] for r in rows}):
        small, large = by_key.get((13, batch_size)), by_key.get((19, batch_size))
        if small and large:
            time_ratio = large["loss_global_ms"] / small["loss_global_ms"]
            mem_ratio = large["loss_global_peak_mib"] / small["loss_global_peak_mib"]
            lines.append(
                f"- batch {batch_size}: 608/416 time x{time_ratio:.2f}, peak memory "
                f"x{mem_ratio:.2f} (S*S grows x{19 * 19 / 13 / 13:.2f})"
            )
    return lines


def postprocess_table(rows: list[dict]) -> list[str]:
    lines = [
        "| head | batch | size | candidates/img | detections/img | postprocess ms | "
        "one batched_nms of all candidates ms | seed-style ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['batch_size']} | {r['size']} | "
            f"{r['candidates_per_image']:.0f} | {r['detections_per_image']:.0f} | "
            f"{r['postprocess_ms']:.2f} | {r['all_candidates_ms']:.2f} | "
            f"{r['seed_style_ms']:.2f} |"
        )
    return lines


def write_results(loss_rows: list[dict], post_rows: list[dict]) -> str:
    machine = machine_line()  # after the measurements
    lines = [
        "# Loss and postprocess cost (CPU, float32)",
        "",
        "Loss: forward+backward, median ms; peak = extra CPU allocation during one "
        "forward+backward (torch.profiler memory events). ResNet18: YOLOv2-ResNet18 "
        "forward+backward, train mode, median ms.",
        "",
        *loss_table(loss_rows),
        "",
        *scaling_lines(loss_rows),
        "",
        "Postprocess (conf 0.005, NMS 0.45, top 100), median ms:",
        "",
        *postprocess_table(post_rows),
        "",
        machine,
        "",
    ]
    text = "\n".join(lines)
    meta = {"machine": machine, "loss": loss_rows, "postprocess": post_rows}
    save_results("loss_speed", text, meta)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--grids", nargs="+", type=int, default=[13, 19])
    parser.add_argument("--loss-iters", type=int, default=30, help="timed loss steps at least")
    parser.add_argument("--model-iters", type=int, default=2, help="timed model steps")
    parser.add_argument("--post-iters", type=int, default=50, help="timed postprocess calls")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds at least")
    parser.add_argument("--no-model", action="store_true", help="skip the ResNet18 timing")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = None
    if not args.no_model:
        from yolo.model import build_model

        model = build_model("resnet18", num_classes=NUM_CLASSES, pretrained=False).train()
    loss_rows = []
    for grid in args.grids:
        for batch_size in args.batch_sizes:
            row = bench_loss(grid, batch_size, args)
            if model is not None:
                bench_model(row, model, args)
            else:
                row["model_ms"], row["loss_percent_of_model"] = float("nan"), float("nan")
            print(row)
            loss_rows.append(row)
    print(write_results(loss_rows, bench_postprocess(args)))


if __name__ == "__main__":
    main()
