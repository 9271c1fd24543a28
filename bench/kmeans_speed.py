"""Speed of the anchor k-means (utils.kmeans.run_kmeans) on a VOC-sized set of box shapes.

Workload: 40,000 synthetic boxes shaped like VOC's (a fixed-seed mixture of log-normal (w, h)
clusters: small objects, people, cars, large and near-full boxes, quantised to the pixels of a
500x375 image and clipped to (0, 1]), k from 1 to 15, 10 k-means++ restarts each, as
``kmeans.py --k 1-15`` runs on VOC 2007+2012 trainval (about 40k non-difficult boxes). Reports
seconds, mean IoU and Lloyd updates kept per k and the total. One torch thread by default, as
kmeans.py: the iterations are many small torch ops, which a second thread slows down on a busy
machine. Writes bench/results/kmeans_speed.{md,json}.

    flock /tmp/bench.lock .venv/bin/python bench/kmeans_speed.py
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import machine_line, save_results  # noqa: E402
from utils.kmeans import run_kmeans  # noqa: E402

IMAGE_SIZE = (500, 375)  # VOC's most common image size (width, height) in pixels
# (median width, median height, log-normal sigma, share of the boxes), fractions of the image
SHAPE_CLUSTERS = (
    (0.07, 0.11, 0.55, 0.25),  # small objects: bottles, birds, far people
    (0.20, 0.45, 0.40, 0.25),  # people, standing
    (0.32, 0.22, 0.40, 0.15),  # cars, animals side on
    (0.55, 0.65, 0.30, 0.20),  # large objects
    (0.92, 0.88, 0.12, 0.15),  # close-ups filling the image
)


def voc_like_box_sizes(num_boxes: int, seed: int) -> torch.Tensor:
    """``[num_boxes, 2]`` float32 (w, h) in (0, 1] from :data:`SHAPE_CLUSTERS`, in whole pixels."""
    rng = np.random.default_rng(seed)
    params = np.array(SHAPE_CLUSTERS)  # [C, 4]
    cluster = rng.choice(len(params), size=num_boxes, p=params[:, 3] / params[:, 3].sum())
    log_wh = np.log(params[cluster, :2]) + rng.normal(size=(num_boxes, 2)) * params[cluster, 2:3]
    pixels = np.clip(np.ceil(np.exp(log_wh) * IMAGE_SIZE), 1, IMAGE_SIZE)  # [M, 2]
    return torch.from_numpy(pixels / IMAGE_SIZE).float()


def bench_sweep(wh: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    rows = []
    for k in range(1, args.k_max + 1):
        start = time.perf_counter()
        result = run_kmeans(wh, k, restarts=args.restarts, seed=args.seed)
        seconds = time.perf_counter() - start
        iterations = result.iterations.tolist()
        rows.append({
            "k": k, "seconds": seconds, "mean_iou": result.mean_iou,
            "max_iterations": max(iterations), "mean_iterations": sum(iterations) / len(iterations),
        })  # fmt: skip
        print(f"k={k:2d} {seconds:6.3f} s  mean IoU {100 * result.mean_iou:.2f}%", flush=True)
    return rows


def write_results(rows: list[dict], args: argparse.Namespace) -> str:
    machine = machine_line()  # after the measurements
    total = sum(r["seconds"] for r in rows)
    lines = [
        f"# Anchor k-means: {args.boxes} VOC-like boxes, k = 1..{args.k_max}, "
        f"{args.restarts} restarts each",
        "",
        "| k | seconds | mean IoU % | Lloyd updates kept (max / mean over restarts) |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['seconds']:.3f} | {100 * r['mean_iou']:.2f} | "
            f"{r['max_iterations']} / {r['mean_iterations']:.1f} |"
        )
    lines += [
        f"| **total** | **{total:.2f}** | | |",
        "",
        "Synthetic VOC-like shapes (see the script), so the IoUs are not the paper's VOC numbers.",
        machine,
        "",
    ]
    text = "\n".join(lines)
    meta = {**vars(args), "total_seconds": total, "machine": machine, "rows": rows}
    save_results("kmeans_speed", text, meta)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=40_000, help="number of box shapes")
    parser.add_argument("--k-max", type=int, default=15, help="k runs from 1 to this")
    parser.add_argument("--restarts", type=int, default=10, help="k-means++ restarts per k")
    parser.add_argument("--seed", type=int, default=0, help="seed of the boxes and of k-means")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wh = voc_like_box_sizes(args.boxes, args.seed)
    run_kmeans(wh[:1000], 3, restarts=2)  # warm-up: first-call allocations and dispatch
    print(write_results(bench_sweep(wh, args), args))


if __name__ == "__main__":
    main()
