"""postprocess speed on the CPU beside a plain per-image loop of ``batched_nms`` and an earlier
revision of yolo/nms.py, for a trained-like and an untrained head (batch 16, 416 x 416, 20
classes, conf 0.005, NMS 0.45), capped at 100 detections an image and uncapped.

The plain loop takes the same candidates (``yolo.nms._candidates``), then per image one
``torchvision.ops.batched_nms``, clip, sort by score and cap; its kept sets are checked equal
to postprocess's. The earlier revision (``--before``, read with ``git show``) ran uncapped as
``max_detections=10**9``. Writes bench/results/postprocess_speed.{md,json}.

Run from the repository root: ``.venv/bin/python bench/postprocess_speed.py``.
"""

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torchvision.ops import batched_nms  # noqa: E402

from bench.common import machine_line, save_results  # noqa: E402
from bench.loss_speed import trained_like_head  # noqa: E402
from utils.anchors import default_anchors  # noqa: E402
from yolo.nms import _candidates, postprocess  # noqa: E402

BEFORE = "d480ad5"  # yolo/nms.py before NMS ran per (image, class) slice


def plain_loop(raw: torch.Tensor, anchors: torch.Tensor, max_detections: int | None) -> list:
    """Per image: ``batched_nms`` of its candidates by class, clip, sort by score, cap."""
    boxes, scores, image, label = _candidates(raw, anchors, 0.005)
    out = []
    for b in range(raw.shape[0]):
        mine = (image == b).nonzero().squeeze(1)
        kept = mine[batched_nms(boxes[mine].double(), scores[mine].double(), label[mine], 0.45)]
        kept = kept.sort().values  # candidate order, then a stable sort by score
        kept = kept[scores[kept].argsort(descending=True, stable=True)][:max_detections]
        columns = (boxes[kept].clamp(0, 1), scores[kept, None], label[kept, None].float())
        out.append(torch.cat(columns, 1))
    return out


def load_before(rev: str):
    """``postprocess`` of yolo/nms.py at ``rev``, or None when git cannot show it."""
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:yolo/nms.py"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("nms_before")
    exec(compile(source, f"{rev}:yolo/nms.py", "exec"), module.__dict__)
    return module.postprocess


def same(first: list, second: list) -> bool:
    return all(
        a.shape == b.shape and torch.allclose(a, b) for a, b in zip(first, second, strict=True)
    )


def interleaved_ms(steps: dict, iters: int) -> dict:
    """Best and median wall time (ms) of each step, the steps taking turns, after a warm-up:
    on a busy machine the best of several turns is the cost of the code."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(iters):
        for name, step in steps.items():
            tick = time.perf_counter()
            step()
            times[name].append(1000 * (time.perf_counter() - tick))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def rows_for(name, raw, anchors, before, iters: int) -> list[dict]:
    rows = []
    for cap in (100, None):
        after = postprocess(raw, anchors, max_detections=cap)
        old_cap = 10**9 if cap is None else cap
        steps = {
            "plain_loop": lambda c=cap: plain_loop(raw, anchors, c),
            "after": lambda c=cap: postprocess(raw, anchors, max_detections=c),
        }
        if before is not None:
            steps["before"] = lambda c=old_cap: before(raw, anchors, max_detections=c)
        row = {
            "head": name,
            "cap": cap,
            "candidates_per_image": len(_candidates(raw, anchors, 0.005)[0]) / len(raw),
            "detections_per_image": sum(len(d) for d in after) / len(raw),
            "same_as_plain_loop": same(after, plain_loop(raw, anchors, cap)),
        }
        if before is not None:
            row["before_same"] = same(before(raw, anchors, max_detections=old_cap), after)
        for step, (best, median) in interleaved_ms(steps, iters).items():
            row[f"{step}_ms"], row[f"{step}_median_ms"] = best, median
        print(row)
        rows.append(row)
    return rows


def table(rows: list[dict], rev: str) -> list[str]:
    lines = [
        f"| head | cap | candidates/img | detections/img | before ({rev}) ms | plain loop ms | "
        "postprocess ms | after / loop | same kept sets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        before = f"{r['before_ms']:.1f}" if "before_ms" in r else "n/a"
        lines.append(
            f"| {r['head']} | {r['cap']} | {r['candidates_per_image']:.0f} | "
            f"{r['detections_per_image']:.0f} | {before} | {r['plain_loop_ms']:.1f} | "
            f"{r['after_ms']:.1f} | {r['after_ms'] / r['plain_loop_ms']:.2f} | "
            f"{r['same_as_plain_loop'] and r.get('before_same', True)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' column")
    parser.add_argument("--iters", type=int, default=7)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(7)
    anchors = default_anchors()
    heads = {
        "trained-like": trained_like_head(16, 13, gen),
        "untrained (N(0,1))": torch.randn(16, 125, 13, 13, generator=gen),
    }
    before = load_before(args.before)
    rows = [r for name, raw in heads.items() for r in rows_for(name, raw, anchors, before,
                                                                args.iters)]  # fmt: skip
    text = "\n".join(
        [
            "# postprocess (CPU, batch 16, 416, 20 classes, conf 0.005, NMS 0.45)",
            "",
            f"Best of {args.iters} interleaved turns, ms (medians in the JSON).",
            "",
            *table(rows, args.before),
            "",
            machine_line(),
            "",
        ]
    )
    print(text)
    save_results("postprocess_speed", text, {"before": args.before, "rows": rows})


if __name__ == "__main__":
    main()
