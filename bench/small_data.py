"""A few hundred real photos, from scratch, over seeds: how steady is `--preset small`, and do
k-means anchors help it? The measurement behind docs/own-data.md and docs/training.md.

The raccoon set (200 photos, VOC XML, one class; github.com/datitran/raccoon_dataset) is
imported as a user would (``import_voc.py``: 160 train, 40 val, seed 0), its anchors are fitted
by ``kmeans.py --k 2-5 --img-size 256`` (the preset's size), and each variant below is trained
with ``train_yolov2.py --preset small`` (60 epochs at 256) for every seed, on one torch thread
and one loader worker per run, ``--parallel`` runs at a time. A run already finished in
``--work`` is read, not run again; an interrupted one resumes; ``--read-only`` reports the
finished runs and trains nothing.

    .venv/bin/python bench/small_data.py --raccoon data/raccoon_dataset --work /tmp/small_data
    .venv/bin/python bench/small_data.py --work /tmp/small_data --variants darknet-ema --seeds 0

Prints, per variant and seed, the best epoch's VOC07 mAP on the 40 val photos, the last epoch's,
their ratio, the spread of the last 10 epochs and the last epoch's COCO mAP (the evaluated
weights: the average with ``--ema``), then the means per variant. On 45 objects VOC07 (AP at
IoU 0.5, 11 recall points) moves by a few points when one box crosses the threshold; COCO mAP
(10 IoU thresholds, 101 points) is the steadier reading. Writes
bench/results/small_data.{md,json} and the curves, bench/results/small_data.png. About 20
minutes a run on one core of a 2-core CPU.
"""

import argparse
import itertools
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import child_env, machine_line, save_results  # noqa: E402
from utils.visualize import save_figure  # noqa: E402

VARIANTS = {  # name -> (train_yolov2.py flags after --preset small, what it is)
    "darknet-ema": (
        [],
        "the import tool's CPU command: darknet's anchors, weight EMA over the "
        "last 5% of the run's steps (3 epochs)",
    ),
    "darknet-ema10": (["--ema-share", "0.1"], "the same, the EMA over the last tenth (6 epochs)"),
    "darknet-raw": (["--no-ema"], "the same without the weight average (the preset before it)"),
    "kmeans256-ema": (
        ["--anchors", "{work}/anchors-256/anchors-5.json"],
        "5 k-means anchors fitted at 256, the training size",
    ),
    "kmeans256-ema10": (
        ["--anchors", "{work}/anchors-256/anchors-5.json", "--ema-share", "0.1"],
        "the same, the EMA over a tenth",
    ),
    "kmeans256k2-ema10": (
        ["--anchors", "{work}/anchors-256/anchors-2.json", "--ema-share", "0.1"],
        "2 k-means anchors fitted at 256, 2 predictors a cell, the EMA over a tenth",
    ),
}
NAME = "raccoon"  # the imported set's name: raccoon:train, raccoon:val


def python(*args: str, log: Path | None = None) -> None:
    """A repository script in a child on one torch thread; its output to ``log`` (else shown)."""
    env = child_env(OMP_NUM_THREADS="1")
    command = [sys.executable, *args]
    if log is None:
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        return
    with open(log, "a") as out:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} exited with {result.returncode}: see {log}")


def prepare(raccoon: Path, work: Path) -> Path:
    """Import the photos and fit the anchors once; returns the imported dataset's folder."""
    data = work / NAME
    if not (data / "classes.txt").is_file():
        if not (raccoon / "annotations").is_dir():
            sys.exit(f"{raccoon}/annotations not found: git clone "
                     f"https://github.com/datitran/raccoon_dataset {raccoon}")  # fmt: skip
        python("import_voc.py", "--images", str(raccoon / "images"),
               "--annotations", str(raccoon / "annotations"), "--out", str(data))  # fmt: skip
    out = work / "anchors-256"
    if not (out / "anchors-5.json").is_file():
        python("kmeans.py", "--data", str(data / f"VOC{NAME}"), "--k", "2-5", "--img-size", "256",
               "--out-dir", str(out))  # fmt: skip
    return data


def finished(last: Path) -> bool:
    return last.is_file() and torch.load(last, map_location="cpu", weights_only=True)["finished"]


def train(work: Path, data: Path, variant: str, seed: int, epochs: int | None) -> Path:
    """One run (resumed where it stopped); returns its last.pt."""
    run = f"{variant}-s{seed}"
    last = work / "m" / run / "last.pt"
    if finished(last):
        return last
    flags = [flag.format(work=work) for flag in VARIANTS[variant][0]]
    extra = ["--epochs", str(epochs)] if epochs else []
    python("train_yolov2.py", "--data", str(data / f"VOC{NAME}"), "--preset", "small",
           *flags, *extra, "--seed", str(seed), "--workers", "1", "--run", run,
           "--model-dir", str(work / "m"), "--log-dir", str(work / "l"), "--resume", "auto",
           log=work / f"{run}.log")  # fmt: skip
    return last


def curves(last: Path) -> dict:
    """VOC07 and COCO mAP of every evaluated epoch of a run (COCO NaN where an older run did not
    record it), and the run's saved settings that tell the variants apart."""
    saved = torch.load(last, map_location="cpu", weights_only=True)
    rows = [row for row in saved["state"]["history"] if "map_voc07" in row]
    config = saved["config"]
    settings = {key: config.get(key) for key in ("anchors", "ema", "ema_decay", "ema_share")}
    return {"map_voc07": [row["map_voc07"] for row in rows], "settings": settings,
            "map_coco": [row.get("map_coco", float("nan")) for row in rows]}  # fmt: skip


def summarise(curves: dict) -> dict | None:
    """The run's numbers (None when no epoch was evaluated)."""
    maps, coco = curves["map_voc07"], curves["map_coco"]
    if not maps:
        return None
    best = max(maps)
    last10 = maps[-10:]
    swings = [abs(b - a) for a, b in itertools.pairwise(maps)]
    return {"best": best, "best_epoch": maps.index(best) + 1, "last": maps[-1],
            "last_over_best": maps[-1] / best if best else 0.0, "last10_min": min(last10),
            "last10_mean": statistics.mean(last10), "last10_sd": statistics.pstdev(last10),
            "swing": statistics.mean(swings) if swings else 0.0,
            "coco_last": coco[-1], "coco_last10_mean": statistics.mean(coco[-10:]),
            "curve": maps, "coco_curve": coco, "settings": curves["settings"]}  # fmt: skip


def table(rows: dict) -> str:
    lines = ["| variant | seed | best (epoch) | last | last / best | last 10: min, mean, sd "
             "| COCO last, last 10 mean |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (variant, seed), r in rows.items():
        lines.append(f"| {variant} | {seed} | {r['best']:.3f} ({r['best_epoch']}) | "
                     f"{r['last']:.3f} | {r['last_over_best']:.2f} | {r['last10_min']:.3f}, "
                     f"{r['last10_mean']:.3f}, {r['last10_sd']:.3f} | "
                     f"{r['coco_last']:.3f}, {r['coco_last10_mean']:.3f} |")  # fmt: skip
    lines += ["", "| variant | seeds | mean best | mean last | worst last / best | mean sd "
              "| mean epoch-to-epoch change | mean COCO last |", "|---" * 8 + "|"]  # fmt: skip
    for variant in dict.fromkeys(v for v, _ in rows):
        rs = [r for (v, _), r in rows.items() if v == variant]
        lines.append(f"| {variant} | {len(rs)} | {statistics.mean(r['best'] for r in rs):.3f} | "
                     f"{statistics.mean(r['last'] for r in rs):.3f} | "
                     f"{min(r['last_over_best'] for r in rs):.2f} | "
                     f"{statistics.mean(r['last10_sd'] for r in rs):.3f} | "
                     f"{statistics.mean(r['swing'] for r in rs):.3f} | "
                     f"{statistics.mean(r['coco_last'] for r in rs):.3f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    """Every run's VOC07 (top) and COCO (bottom) mAP per epoch, one column per variant."""
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(v for v, _ in rows))
    fig, axes = plt.subplots(2, len(variants), figsize=(4 * len(variants), 6), sharey="row",
                             sharex=True, squeeze=False)  # fmt: skip
    for column, variant in enumerate(variants):
        for (v, seed), r in rows.items():
            if v == variant:
                for ax, key in zip(axes[:, column], ("curve", "coco_curve"), strict=True):
                    ax.plot(range(1, len(r[key]) + 1), r[key], label=f"seed {seed}", lw=1.2)
        axes[0][column].set_title(variant, fontsize=10)
        axes[1][column].set_xlabel("epoch")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("VOC07 mAP (40 val photos)")
    axes[1][0].set_ylabel("COCO mAP .5:.95")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raccoon", type=Path, default=Path(
        os.environ.get("YOLO_RACCOON_DIR", ROOT / "data" / "raccoon_dataset")))  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/small_data"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument("--epochs", type=int, help="instead of the preset's 60 (a quick try)")
    parser.add_argument("--read-only", action="store_true",
                        help="train nothing: report the finished runs found in --work")  # fmt: skip
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    if args.read_only:  # runs are found by name: their saved settings go into the JSON
        data = args.work / NAME
        jobs = [(v, s) for v, s in jobs if finished(args.work / "m" / f"{v}-s{s}" / "last.pt")]
    else:
        data = prepare(args.raccoon, args.work)
    if not jobs:
        sys.exit(f"no finished run of {args.variants} in {args.work / 'm'}")
    with ThreadPoolExecutor(args.parallel) as pool:
        lasts = list(pool.map(lambda job: train(args.work, data, *job, args.epochs), jobs))
    rows = {job: summarise(curves(last)) for job, last in zip(jobs, lasts, strict=True)}
    if unevaluated := [f"{v}-s{s}" for (v, s), r in rows.items() if r is None]:
        print(f"no evaluated epoch in {', '.join(unevaluated)}: left out")
    rows = {job: r for job, r in rows.items() if r is not None}
    if not rows:
        sys.exit("nothing to report")
    text = table(rows)
    notes = "\n".join(f"- {v}: {VARIANTS[v][1]}" for v in dict.fromkeys(v for v, _ in rows))
    machine = machine_line("1 per run")
    where = f"{machine}, {args.parallel} runs at a time"
    if args.read_only:
        where = f"Read from the finished runs in --work (one torch thread each). {machine}"
    report = f"# Small data over seeds: raccoon, `--preset small`\n\n{notes}\n\n{text}\n\n{where}\n"
    print(report)
    plot(rows, ROOT / "bench" / "results" / "small_data.png")
    payload = {f"{v}-s{s}": r for (v, s), r in rows.items()}
    save_results("small_data", report, {"runs": payload, "machine": where})
    return 0


if __name__ == "__main__":
    sys.exit(main())
