"""The CUDA path in one run: gpu tests, training and inference speed, resume, torchrun + NCCL.

On one CUDA GPU, in under 8 minutes with its set-up, writes ``<out-dir>/gpu.md`` and ``.json``
(default bench/results/): device, driver, torch/CUDA/cuDNN/NCCL versions and each section's
numbers. Each section has a time budget and its own try/except, and the files are rewritten
after every row, so a failure, a timeout or a kill still leaves the rest:
1. ``pytest -m gpu`` over tests/ in a subprocess (tests/test_gpu.py: CUDA equals CPU);
2. training through the engine's ``train_one_epoch`` (AMP, channels_last, as ``fit``):
   darknet19, tiny, resnet18 at 416 and darknet19 at 608, batch 64 (halved on OOM), on pinned
   in-memory batches and on the real loader over generated JPEGs (4, 8, 16 workers), each with
   both data paths: darknet's augmentation per image in the workers, or batched on the GPU;
3. inference, darknet19 at 416 and 544, batch 1 and 32, fp32 and bf16, eager and
   ``torch.compile``: model-only and end-to-end (``postprocess``) images/s, synchronised;
4. ``fit`` 2 epochs (tiny, AMP), SIGINT mid-epoch, resumed in a new process, against a
   straight run, under cuDNN determinism and under the engine's own settings;
5. ``torchrun --nproc_per_node 1`` of train_yolov2.py for one epoch, and an NCCL probe.
Without CUDA, or with ``--quick``, every section is tiny and the CUDA-only parts are recorded
as skipped (tests/test_gpu_check.py runs it so):

    make gpu-check                                      # .venv/bin/python bench/gpu_check.py
    python bench/gpu_check.py --quick --out-dir /tmp/gpu

On any machine with a CUDA GPU and network, in the repository root, run ``make gpu-check``
(it creates .venv from requirements-dev.txt, then runs this script) and commit the
bench/results/gpu.md and gpu.json it writes. A GPU machine without network installs from
wheels fetched elsewhere: on a machine with network, for the GPU machine's Python version
(3.12 below) and platform,

    pip download -r requirements-dev.txt -d wheels --only-binary=:all: --python-version 3.12
    # add: --platform manylinux_2_28_x86_64 when the two machines differ

copy the wheels folder into the repository on the GPU machine, and there run

    PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/wheels make gpu-check

(pip reads its options from the environment; the table goes to stdout, progress bars and
warnings to stderr).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    RESULTS,
    Budget,
    Report,
    child_env,
    environment,
    junit_counts,
    resume_phases,
    run_checked,
    run_child,
    run_section,
    sync,
    time_calls,
    time_training,
)
from utils.batch_augment import DeferredTrainTransform, augment_batch, collate_raw  # noqa: E402
from utils.demo import generate_demo_dataset  # noqa: E402
from utils.loader import build_dataloader  # noqa: E402
from yolo.build import build_loaders, build_training  # noqa: E402
from yolo.checkpoint import load_checkpoint  # noqa: E402
from yolo.config import TrainConfig  # noqa: E402
from yolo.load import resolve_anchors  # noqa: E402
from yolo.model import build_model  # noqa: E402
from yolo.nms import postprocess  # noqa: E402
from yolo.runtime import Runtime, setup_runtime  # noqa: E402
from yolo.schedule import build_schedule  # noqa: E402
from yolo.testing import measure_fps  # noqa: E402

SECTIONS = {  # name: (title, seconds on CUDA: 8 minutes in all, with Python's start)
    "setup": ("0. Set-up: pytest started, data generated", 45),
    "pytest": ("1. pytest -m gpu", 60),
    "train": ("2. Training throughput through train_one_epoch", 125),
    "inference": ("3. Inference images/s, darknet19", 95),
    "resume": ("4. Resume after SIGINT against a straight run", 85),
    "torchrun": ("5. torchrun --nproc_per_node 1 and NCCL", 55),
}
NO_CUDA = "skipped: no CUDA"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the sections do: the CUDA plan, or the quick one (no CUDA, or ``--quick``)."""

    cuda: bool = True
    images: tuple = (640, 375, 500)  # generated training images, sides from-to (VOC-like)
    train_cases: tuple = (("darknet19", 416), ("tiny", 416), ("resnet18", 416), ("darknet19", 608))
    batch_size: int = 64
    workers: tuple = (4, 8, 16)  # all for the first case, the last for the others
    warmup: int = 4  # batches: in memory 2 more (cuDNN tuning), files one more per worker
    steps: int = 20
    premade: int = 4  # distinct in-memory batches, cycled
    infer: tuple = ((416, 544), (1, 32), (torch.bfloat16, torch.float32), ("eager", "compile"))
    infer_time: tuple = (5, 50, 10, 0.5)  # warm-up calls; batch 1 calls; others: calls, seconds
    resume: tuple = (32, 96, 8, 2, 6, 2)  # images, size, batch, workers, SIGINT at, epochs
    resume_modes: tuple = ("deterministic", "engine")


QUICK = Plan(
    cuda=False, images=(4, 64, 96), train_cases=(("tiny", 32),), batch_size=2, workers=(0,),
    warmup=0, steps=1, premade=1, infer=((32,), (1, 2), (torch.float32,), ("eager",)),
    infer_time=(1, 1, 1, 0.0), resume=(4, 32, 2, 0, 1, 1), resume_modes=("engine",),
)  # fmt: skip


@dataclasses.dataclass
class Context:
    report: Report
    plan: Plan
    runtime: Runtime
    folder: Path  # temporary: data, runs, logs
    data: Path | None = None  # the generated demo set
    pytest: tuple | None = None  # (the pytest process, its start time)


# 0-1. set-up and pytest -m gpu --------------------------------------------------------------


def setup_section(ctx: Context, budget: Budget) -> str:
    """Start ``pytest -m gpu`` (with CUDA: without it every one of those tests skips), then
    generate the data while it runs."""
    if ctx.plan.cuda:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                   f"--junitxml={ctx.folder / 'pytest.xml'}", "tests"]  # fmt: skip
        with open(ctx.folder / "pytest.log", "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=log, stderr=log)
        ctx.pytest = (process, time.perf_counter())
    count, low, high = ctx.plan.images
    ctx.data = generate_demo_dataset(ctx.folder / "data", num_train=count, num_val=2, seed=0,
                                     min_size=low, max_size=high)  # fmt: skip
    return f"{count} demo JPEGs of {low}-{high} px a side"


def pytest_section(ctx: Context, budget: Budget) -> str:
    if ctx.pytest is None:
        return f"{NO_CUDA}: every gpu-marked test would skip"
    process, start = ctx.pytest
    try:
        code = process.wait(timeout=max(budget.left(), 1))
    finally:
        process.kill()
    counts, failed = junit_counts(ctx.folder / "pytest.xml")
    ctx.report.row("pytest", **counts, exit_code=code, seconds=time.perf_counter() - start)
    if code != 0:
        tail = "\n".join((ctx.folder / "pytest.log").read_text().splitlines()[-20:])
        raise RuntimeError(f"failed: {', '.join(failed) or '-'}\n{tail}")
    return ""


# 2. training throughput ---------------------------------------------------------------------


def train_case(ctx: Context, budget: Budget, name: str, size: int, workers: tuple) -> int:
    """One model and size at the batch that fits (halved on OOM) -> that batch size."""
    batch_size = ctx.plan.batch_size
    while True:
        try:
            train_rows(ctx, budget, name, size, batch_size, workers)
            return batch_size
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
        finally:
            gc.collect()
            if ctx.plan.cuda:
                torch.cuda.empty_cache()


def device_loader(loader, workers: int):
    """``loader``'s dataset and settings with the device path's worker side: decode and draw
    the parameters (``DeferredTrainTransform``), batches as ``RawBatch`` (``collate_raw``)."""
    dataset = copy.copy(loader.dataset)  # the records are shared, the transform is not
    dataset.transform = DeferredTrainTransform(dataset.transform)
    sampler = loader.sampler
    return build_dataloader(dataset, batch_size=loader.batch_size, shuffle=sampler.shuffle,
                            seed=sampler.seed, workers=workers, drop_last=loader.drop_last,
                            pin_memory=loader.pin_memory, collate_fn=collate_raw)  # fmt: skip


def augmented(batches, runtime: Runtime, size: int):
    """``RawBatch`` batches -> the step's (images, targets, metas), the pixels made on the
    device at ``size`` as the engine's step does with ``--augment-on device``. Its work is
    queued here (no host sync), so its launches count as data time, its GPU time as step."""
    for raw, targets, metas in batches:
        yield augment_batch(raw.to(runtime.device, non_blocking=True), size), targets, metas


def memory_rows(ctx: Context, built: tuple, loader, row: dict, timing: dict) -> dict:
    """The in-memory rows of both paths: ``plan.premade`` batches of each, pinned, cycled; the
    device path's ``RawBatch`` augmented on the device every step. -> the per-image row."""
    memory = None
    for augment in ("cpu", "device"):
        source = loader if augment == "cpu" else device_loader(loader, 0)
        premade = [tuple(t.pin_memory() if ctx.plan.cuda else t for t in batch[:2]) + batch[2:]
                   for batch in itertools.islice(source, ctx.plan.premade)]  # fmt: skip
        batches = itertools.cycle(premade)
        if augment == "device":
            batches = augmented(batches, ctx.runtime, timing["size"])
        timed = time_training(*built, batches, warmup=ctx.plan.warmup + 2, **timing)
        memory = memory or timed
        ctx.report.row("train", **row, loader="in memory, pinned", augment=augment, **timed,
                       vs_memory=timed["images_per_s"] / memory["images_per_s"])  # fmt: skip
    return memory


def train_rows(ctx: Context, budget: Budget, name: str, size: int, batch_size: int,
               workers: tuple) -> None:  # fmt: skip
    """In-memory batches first (pinned; their warm-up also tunes cuDNN): the per-image path's
    and the device path's (``RawBatch``, augmented on the device every step), then the real
    loader of each path, a fresh one per worker count: its first batches (one per worker)
    come at once, so the warm-up is one batch more per worker."""
    plan, runtime, root = ctx.plan, ctx.runtime, ctx.data
    need = (plan.premade + max(workers) + plan.warmup + plan.steps) * batch_size
    config = TrainConfig(
        model=name, data_root=str(root), val_set="demo:val",
        train_sets=("demo:train",) * -(-need // plan.images[0]),  # one epoch covers a row
        classes=str(root / "demo_classes.txt"), epochs=1, batch_size=batch_size, accum=1,
        img_size=size, multi_scale=False, workers=max(workers), device=str(runtime.device),
    )  # fmt: skip
    classes = tuple(Path(config.classes).read_text().split())
    built = build_training(config, len(classes), resolve_anchors(None), runtime)
    loader, _ = build_loaders(config, classes, runtime)
    timing = dict(runtime=runtime, schedule=build_schedule(config, len(loader)), size=size,
                  steps=plan.steps)  # fmt: skip
    row = dict(model=name, size=size, batch=batch_size)
    memory = memory_rows(ctx, built, loader, row, timing)
    del loader  # its workers stop
    for count, augment in itertools.product(workers, ("cpu", "device")):
        files = f"files, {count} workers"
        if budget.left() < 15:
            ctx.report.row("train", **row, loader=f"{files}: budget spent", augment=augment)
            continue
        loader, _ = build_loaders(dataclasses.replace(config, workers=count), classes, runtime)
        batches = iter(loader)
        if augment == "device":
            loader = device_loader(loader, count)
            batches = augmented(iter(loader), runtime, size)
        timed = time_training(*built, batches, warmup=count + plan.warmup, **timing)
        ratio = timed["images_per_s"] / memory["images_per_s"]
        ctx.report.row("train", **row, loader=files, augment=augment, **timed, vs_memory=ratio)
        del loader, batches


def train_section(ctx: Context, budget: Budget) -> str:
    fitted = []
    for index, (name, size) in enumerate(ctx.plan.train_cases):
        if budget.left() < 20:
            ctx.report.row("train", model=name, size=size, loader="budget spent")
            continue
        workers = ctx.plan.workers if index == 0 else ctx.plan.workers[-1:]
        try:
            fitted.append(f"{name} {size}: {train_case(ctx, budget, name, size, workers)}")
        except Exception as error:  # reported; the other models still run
            ctx.report.row("train", model=name, size=size, loader=f"failed: {error!r}"[:300])
    count, low, high = ctx.plan.images
    return (
        f"Batch that fits (of {ctx.plan.batch_size}, halved on OOM): {', '.join(fitted)}. "
        f"{ctx.plan.steps} timed batches a row, an optimizer step each, AMP "
        f"{ctx.runtime.precision}, channels_last on CUDA, random init, no multi-scale. Files: "
        f"{count} generated demo JPEGs of {low}-{high} px a side (VOC's photos are about "
        "500x375; drawn shapes on smooth backgrounds make smaller files, quicker to decode), "
        "darknet's augmentation, the set listed repeatedly so that one epoch covers a row. "
        "augment cpu: per image in the workers (utils.transforms); device: the workers decode "
        "and draw the parameters, utils.batch_augment.augment_batch makes the batch on the "
        "device before each step (queued without a sync: its launches count as data wait, "
        f"its GPU time in the step). In memory: {ctx.plan.premade} such batches of each path, "
        "pinned, cycled. data_share: time spent waiting for the next batch; vs_memory: "
        "images/s against the in-memory cpu row."
    )


# 3. inference -------------------------------------------------------------------------------


def speeds(ctx: Context, model, anchors, size: int, batch: int, runtime: Runtime) -> dict:
    """Model-only and end-to-end images/s; batch 1 through the project's ``measure_fps``."""
    warmup, fps_iters, min_iters, min_s = ctx.plan.infer_time
    images = runtime.to_device(torch.rand(batch, 3, size, size))
    with torch.no_grad(), runtime.autocast():
        row = {"dets_per_img": sum(map(len, postprocess(model(images).float(), anchors))) / batch}
    if batch == 1:
        fps = measure_fps(model, anchors, img_size=size, runtime=runtime, iters=fps_iters,
                          warmup=warmup)  # fmt: skip
        return {"model_img_s": fps["fps_model"], "end_to_end_img_s": fps["fps_end_to_end"], **row}
    jobs = {"model_img_s": lambda: model(images),
            "end_to_end_img_s": lambda: postprocess(model(images).float(), anchors)}  # fmt: skip
    with torch.no_grad(), runtime.autocast():
        for key, job in jobs.items():
            calls, seconds = time_calls(job, runtime.device, min_iters=min_iters, min_s=min_s,
                                        warmup=warmup)  # fmt: skip
            row[key] = batch * calls / seconds
    return row


def compile_first_call(model, runtime: Runtime, size: int, batch: int) -> float:
    """Seconds of a compiled model's first call at this shape and dtype (its compilation)."""
    start = time.perf_counter()
    with torch.no_grad(), runtime.autocast():
        model(runtime.to_device(torch.rand(batch, 3, size, size)))
    sync(runtime.device)
    return time.perf_counter() - start


def inference_section(ctx: Context, budget: Budget) -> str:
    device, (sizes, batches, dtypes, modes) = ctx.runtime.device, ctx.plan.infer
    layout = torch.channels_last if ctx.plan.cuda else torch.contiguous_format
    eager = build_model("darknet19").eval().to(device, memory_format=layout)
    anchors, failure = resolve_anchors(None).to(device), ""
    compiled = torch.compile(eager, dynamic=False) if "compile" in modes else None  # lazy
    for mode, dtype, size, batch in itertools.product(modes, dtypes, sizes, batches):
        row = dict(mode=mode, size=size, batch=batch, dtype=str(dtype).removeprefix("torch."))
        runtime = Runtime(device, amp_dtype=None if dtype == torch.float32 else dtype)
        if failure or budget.left() < (40 if mode == "compile" else 5):
            ctx.report.row("inference", **row, note=failure or "budget spent")
            continue
        model = eager
        if mode == "compile":
            try:
                row["compile_s"] = compile_first_call(compiled, runtime, size, batch)
            except Exception as error:  # reported; the eager rows stand
                failure = f"compile failed: {type(error).__name__}: {str(error)[:300]}"
                ctx.report.row("inference", **row, note=failure)
                continue
            model = compiled
        ctx.report.row("inference", **row, **speeds(ctx, model, anchors, size, batch, runtime))
    skipped = "" if ctx.plan.cuda else f"{NO_CUDA}: bf16, torch.compile, 416/544, batch 32. "
    return skipped + (
        "Random weights (darknet's init, objectness prior 0.01): no box scores above the "
        "evaluation threshold 0.005, so end to end adds decode and threshold but no NMS "
        "(dets_per_img). fp32: TF32 convolutions, as setup_runtime sets. Batch 1: "
        "yolo.testing.measure_fps (50 calls after 5); batch 32: at least 10 calls and 0.5 s; "
        "synchronised. compile_s: torch.compile's first call at that shape and dtype."
    )


# 4. resume ----------------------------------------------------------------------------------


def resume_section(ctx: Context, budget: Budget) -> str:
    num_train, *plan = ctx.plan.resume
    size, batch_size, workers, stop_at, epochs = plan
    root = generate_demo_dataset(ctx.folder / "resume-data", num_train=num_train, num_val=2,
                                 seed=1, min_size=64, max_size=128)  # fmt: skip
    phases = ["straight", "interrupted", "resumed"]  # a user's resume is a new process
    for mode in ctx.plan.resume_modes:
        if budget.left() < 25:
            ctx.report.row("resume", mode=mode, stopped_at="budget spent")
            continue
        env = child_env(CUBLAS_WORKSPACE_CONFIG=":4096:8") if mode == "deterministic" else None
        start, folder, ops, result = time.perf_counter(), ctx.folder / mode, set(), {}
        for part in [phases[:2], phases[2:]] if ctx.plan.cuda else [phases]:
            kwargs = dict(phases=part, mode=mode, root=str(root), folder=str(folder), plan=plan)
            if ctx.plan.cuda:
                found = run_child(
                    "bench.common", "resume_phases", kwargs, timeout=budget.left(), env=env
                )
            else:  # the quick run saves the child processes' start-up
                found = resume_phases(**kwargs)
            ops.update(found.pop("nondeterministic_ops"))
            result.update(found)
        ctx.report.row("resume", mode=mode, **result, seconds=time.perf_counter() - start,
                       nondeterministic_ops=", ".join(sorted(ops)) or None)  # fmt: skip
    children = "in two child processes, the resume in the second" if ctx.plan.cuda else "here"
    return (
        f"tiny, {num_train} generated images at {size} px (multi-scale to {2 * size}), batch "
        f"{batch_size}, {workers} workers, AMP {ctx.runtime.precision}, {epochs} epochs, SIGINT "
        f"in training forward pass {stop_at}; run {children}. deterministic: cudnn.benchmark off, "
        "cudnn.deterministic and torch.use_deterministic_algorithms(warn_only) on, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8. engine: fit's own settings, where cudnn.benchmark "
        "picks algorithms by timing in each process, so a resumed process may sum in another "
        "order: a small difference is expected there."
    )


# 5. torchrun --------------------------------------------------------------------------------


def torchrun_train_command(root: Path, folder: Path, device: str) -> list[str]:
    """torchrun of train_yolov2.py (darknet19) for one epoch at 320 on the generated set."""
    return [*TORCHRUN, str(ROOT / "train_yolov2.py"), f"--data-root={root}", "--train-sets",
            "demo:train", "--val-set=demo:val", f"--classes={root / 'demo_classes.txt'}",
            "--epochs=1", "--batch-size=32", "--accum=1", "--img-size=320",
            "--eval-img-size=320", "--no-multi-scale", "--workers=8", "--run-name=ddp",
            f"--model-dir={folder}/model", f"--log-dir={folder}/logs", f"--device={device}",
            "--num-vis-images=0"]  # fmt: skip


def torchrun_section(ctx: Context, budget: Budget) -> str:
    if not ctx.plan.cuda:
        return f"{NO_CUDA}: NCCL needs CUDA (tests/test_train.py runs DDP with gloo on the CPU)"
    folder, start = ctx.folder / "torchrun", time.perf_counter()
    run_checked(torchrun_train_command(ctx.data, folder, "cuda"), budget.left())
    state = load_checkpoint(folder / "model/ddp/last.pt")["state"]
    best = state["best_map"]  # None when the val images hold no object
    done = f"{state['iteration']} steps, map_voc07 {'-' if best is None else f'{best:.3f}'}"
    ctx.report.row("torchrun", run="train_yolov2.py, 1 epoch", ok=state["epoch"] == 1,
                   seconds=time.perf_counter() - start, result=done)  # fmt: skip
    start = time.perf_counter()
    probe = run_child("bench.common", "nccl_probe", {}, timeout=budget.left(),
                      launcher=(*TORCHRUN, "--no-python", sys.executable))  # fmt: skip
    ctx.report.row("torchrun", run="NCCL probe", ok=probe["broadcast_flag"] == [False, True],
                   seconds=time.perf_counter() - start, result=json.dumps(probe))  # fmt: skip
    return (
        "Launched by torchrun, yolo.runtime.setup_runtime joins an NCCL process group also "
        "with one process, so train_yolov2.py runs the multi-GPU path (DDP, broadcast_flag's "
        "all_reduce on a CUDA tensor, the evaluation's gather) on one GPU. The probe makes the "
        "same collectives alone."
    )


# main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="tiny sections (always without CUDA)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="for gpu.md and gpu.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    plan = Plan() if cuda and not args.quick else dataclasses.replace(QUICK, cuda=cuda)
    if not plan.cuda:  # a smoke run on a shared CPU, where threads waiting on each other cost most
        torch.set_num_threads(1)
    runtime = setup_runtime("auto", amp=True)
    try:
        header = environment()
    except Exception as error:  # the checks matter more than the versions
        header = {"environment": f"not read: {error!r}"}
    header["plan"] = "full" if plan == Plan() else "quick"
    report = Report(args.out_dir, "gpu", "GPU check (bench/gpu_check.py)", header)
    jobs = {"setup": setup_section, "pytest": pytest_section, "train": train_section,
            "inference": inference_section, "resume": resume_section,
            "torchrun": torchrun_section}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        ctx = Context(report, plan, runtime, Path(folder))
        for name, job in jobs.items():
            run_section(report, name, *SECTIONS[name], job, ctx)
    print(f"\nwrote {report.paths[0]} and {report.paths[1]}")


if __name__ == "__main__":
    main()
