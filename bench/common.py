"""What the bench scripts share: the line naming the machine, writing the results, timing
(synchronised calls, training steps through the engine's own ``train_one_epoch``), sections with
time budgets written as they go, child processes, and the GPU check's child-side functions."""

import dataclasses
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch import nn

import yolo.build
import yolo.train
from utils.fileio import atomic_write_text
from yolo.checkpoint import load_checkpoint
from yolo.config import TrainConfig
from yolo.runtime import broadcast_flag, setup_runtime, teardown_runtime
from yolo.train import TrainState, fit, train_one_epoch

__all__ = [
    "RESULTS",
    "Batches",
    "Budget",
    "Report",
    "SectionTimeout",
    "child_env",
    "compare_checkpoints",
    "environment",
    "fit_with_signal",
    "junit_counts",
    "machine_line",
    "nccl_probe",
    "resume_phases",
    "run_checked",
    "run_child",
    "run_section",
    "save_results",
    "sync",
    "time_calls",
    "time_training",
]

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(torch_threads: str | None = None) -> str:
    """``Machine: <cpu>, N CPUs, T torch threads, versions, load average[, GPU]``; call it when
    the measurements are done, so that the load average covers them. ``torch_threads``
    replaces the thread count (e.g. ``"1 per process"``: ``1 per process torch threads``)."""
    threads = torch_threads or str(torch.get_num_threads())
    line = (
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, {threads} torch threads, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


def save_results(name: str, text: str, payload: dict) -> None:
    """Write ``bench/results/<name>.md`` (``text``) and ``.json`` (``payload``), atomically."""
    atomic_write_text(RESULTS / f"{name}.md", text)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")


class Batches:
    """The next ``count`` items of a shared iterator, with the length a loader has: lets the
    engine's ``train_one_epoch`` run part of an epoch of a loader that keeps its workers."""

    def __init__(self, iterator, count: int):
        self.iterator, self.count = iterator, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return itertools.islice(self.iterator, self.count)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, *, min_iters: int, min_s: float, warmup: int = 2):
    """Call ``fn()`` ``warmup`` times, then until both ``min_iters`` calls and ``min_s`` seconds
    are done -> (timed calls, seconds from the first timed call until the device finished the
    last; the host may queue ahead of the GPU, the final synchronisation counts it all)."""
    for _ in range(warmup):
        fn()
    sync(device)
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_s:
        fn()
        iters += 1
    sync(device)  # the clock stops when the GPU has done every timed call
    return iters, time.perf_counter() - start


def time_training(
    model, criterion, optimizer, scaler, batches, *, runtime, schedule, size: int,
    warmup: int, steps: int, accum: int = 1,
) -> dict:  # fmt: skip
    """Train ``warmup`` then ``steps`` items of the iterator ``batches`` ((images, targets,
    metas) as the loader yields them, at ``size``) through the engine's ``train_one_epoch``;
    the timed part's images/s, ms per batch, share of time waiting for data and (CUDA) peak
    memory allocated. With ``accum`` 1 an optimizer step ends every batch with a host sync (the
    engine's finite check), so GPU work does not leak into the next data wait."""
    state = TrainState()

    def run(count: int):
        metrics, _ = train_one_epoch(
            model, criterion, Batches(batches, count), optimizer, scaler, state,
            schedule=schedule, sizes=(size,), size_every=10, seed=0, accum=accum,
            runtime=runtime,
        )  # fmt: skip
        return metrics

    run(warmup)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    timed = run(steps)
    total_s = timed.data_s + timed.compute_s
    row = {
        "images": timed.images, "images_per_s": timed.images / total_s,
        "ms_per_batch": 1000 * total_s / steps, "data_share": timed.data_s / total_s,
    }  # fmt: skip
    if runtime.device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
    return row


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a Python child: the repository first on PYTHONPATH
    (kept: a device machine's carried wheels), unbuffered output, plus ``extra``."""
    paths = [str(RESULTS.parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "PYTHONUNBUFFERED": "1", **extra}  # fmt: skip


def environment() -> dict:
    """Versions and the device: torch, CUDA, cuDNN, NCCL, the driver (nvidia-smi), the GPU."""
    env = {"machine": machine_line(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name, capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())), driver=_driver_version(),
        )  # fmt: skip
    return env


def _driver_version() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({type(error).__name__})"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


class Report:
    """Sections of rows, printed as markdown table rows as they come and rewritten to
    ``<out_dir>/<name>.md`` and ``.json`` after every change (a killed run keeps its rows)."""

    def __init__(self, out_dir: Path, name: str, title: str, header: dict):
        self.paths = (Path(out_dir) / f"{name}.md", Path(out_dir) / f"{name}.json")
        self.title, self.header, self.sections = title, header, {}
        self._printed: dict[str, list[str]] = {}

    def start(self, name: str, title: str, budget_s: float) -> None:
        self.sections[name] = {"title": title, "status": "running", "budget_s": budget_s,
                               "seconds": None, "note": "", "rows": []}  # fmt: skip
        print(f"\n## {title} (budget {budget_s:.0f} s)", flush=True)
        self.save()

    def row(self, name: str, **row) -> None:
        self.sections[name]["rows"].append(row)
        columns = self._printed.get(name)
        if columns is None or not set(row) <= set(columns):
            columns = self._printed[name] = list(row)
            print(f"| {' | '.join(columns)} |", flush=True)
        print(f"| {' | '.join(_cell(row.get(c)) for c in columns)} |", flush=True)
        self.save()

    def finish(self, name: str, status: str, seconds: float, note: str) -> None:
        self.sections[name].update(status=status, seconds=round(seconds, 1), note=note)
        print(f"{status} in {seconds:.0f} s{': ' + note if note else ''}", flush=True)
        self.save()

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        lines += [f"- {key}: {value}" for key, value in self.header.items()]
        for section in sorted(self.sections.values(), key=lambda item: item["title"]):
            seconds = "-" if section["seconds"] is None else f"{section['seconds']:.0f}"
            status = f"{section['status']} in {seconds} s (budget {section['budget_s']} s)"
            lines += ["", f"## {section['title']}", "", status]
            note = section["note"]
            if note:
                lines += ["", f"```\n{note}\n```" if "\n" in note else note]
            columns = list(dict.fromkeys(key for row in section["rows"] for key in row))
            if columns:
                lines += ["", f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
                lines += [f"| {' | '.join(_cell(r.get(c)) for c in columns)} |"
                          for r in section["rows"]]  # fmt: skip
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        payload = {"title": self.title, **self.header, "sections": self.sections}
        atomic_write_text(self.paths[0], self.markdown())
        atomic_write_text(self.paths[1], json.dumps(payload, indent=2, default=str) + "\n")


class SectionTimeout(Exception):
    """A section ran past its budget's grace (raised by SIGALRM in the main thread)."""


class Budget:
    """A section's seconds: ``left()`` to plan the next item; SIGALRM stops an item stuck
    ``grace`` seconds past the end (``subprocess.run`` kills its child on the way out)."""

    def __init__(self, seconds: float, grace: float = 20.0):
        self.seconds, self.grace, self.end = seconds, grace, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def __enter__(self) -> "Budget":
        def expire(signum, frame):
            raise SectionTimeout(f"stopped {self.grace:.0f} s past its {self.seconds} s budget")

        self._previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds + self.grace)
        return self

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)


def run_section(report: Report, name: str, title: str, seconds: float, job, *args) -> None:
    """``job(*args, budget) -> note`` under a :class:`Budget`; an exception is recorded as the
    section's failure (with the end of its message), never raised."""
    report.start(name, title, seconds)
    start, status, note = time.perf_counter(), "ok", ""
    try:
        with Budget(seconds) as budget:
            note = job(*args, budget) or ""
    except Exception as error:  # one section's failure must not stop the others
        status, note = "failed", f"{type(error).__name__}: {str(error).strip()[-1500:]}"
    report.finish(name, status, time.perf_counter() - start, note)


def fit_with_signal(config, at_forward: int, signum: int) -> tuple[dict, dict]:
    """``yolo.train.fit(config)`` with ``signum`` raised inside training forward pass number
    ``at_forward`` (a hook on the model ``build_train_model`` returns) -> (fit's summary, the
    state in the run's last.pt)."""
    build, calls = yolo.build.build_train_model, {"n": 0}

    def hook(module, args, output):
        calls["n"] += module.training
        if module.training and calls["n"] == at_forward:
            signal.raise_signal(signum)

    def hooked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(hook)
        return model

    yolo.build.build_train_model = hooked
    try:
        summary = fit(config)
    finally:
        yolo.build.build_train_model = build
    return summary, load_checkpoint(Path(config.model_dir) / config.run / "last.pt")["state"]


def compare_checkpoints(first: Path, second: Path) -> dict:
    """Two checkpoints' model weights: equal bit for bit, the largest absolute difference and
    the largest weight (for scale); both must have trained the same number of epochs."""
    a, b = load_checkpoint(first), load_checkpoint(second)
    if a["state"]["epoch"] != b["state"]["epoch"]:
        raise RuntimeError(f"{first} and {second} trained {a['state']['epoch']} and "
                           f"{b['state']['epoch']} epochs")  # fmt: skip
    a, b = a["model"], b["model"]
    floats = [key for key in a if a[key].is_floating_point()]
    return {
        "bit_exact": all(torch.equal(a[key], b[key]) for key in a),
        "max_abs_diff": max((a[key] - b[key]).abs().max().item() for key in floats),
        "largest_weight": max(a[key].abs().max().item() for key in floats),
    }


def run_checked(command: list, timeout: float, env=None, name: str = "") -> dict | None:
    """Run ``command`` from the repository root -> the JSON object of its last stdout line, if
    it printed one; a non-zero exit raises with the end of its stderr."""
    result = subprocess.run(command, cwd=RESULTS.parents[1], env=env or child_env(),
                            capture_output=True, text=True, timeout=max(timeout, 1))  # fmt: skip
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-12:])
        what = name or " ".join(map(str, command[:6]))
        raise RuntimeError(f"{what} exited with {result.returncode}:\n{tail}")
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None


def run_child(module: str, function: str, kwargs: dict, *, timeout: float, env=None,
              launcher=(sys.executable,)) -> dict:  # fmt: skip
    """``module.function(**kwargs)`` in a child Python (started by ``launcher``, e.g. torchrun)
    -> the JSON-able dict it returned."""
    code = (f"import json, sys; from {module} import {function}; "
            f"print(json.dumps({function}(**json.loads(sys.argv[1]))))")  # fmt: skip
    command = [*launcher, "-c", code, json.dumps(kwargs)]
    return run_checked(command, timeout, env, name=f"{module}.{function}")


def junit_counts(path: Path) -> tuple[dict, list[str]]:
    """A pytest JUnit XML file -> ({passed, failed, errors, skipped}, failed test names)."""
    counts, failed = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0), []
    for suite in ElementTree.parse(path).getroot().iter("testsuite"):
        counts = {key: value + int(suite.get(key, 0)) for key, value in counts.items()}
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary = {"passed": passed, "failed": counts["failures"], "errors": counts["errors"],
               "skipped": counts["skipped"]}  # fmt: skip
    return summary, failed


# The GPU check's child processes -------------------------------------------------------------


def resume_phases(phases: list, mode: str, root: str, folder: str, plan: list) -> dict:
    """The resume check's ``phases`` (in a child process with CUDA: mode "deterministic"
    patches the engine for good).

    "straight" trains the epochs; "interrupted" trains another run, stopped by SIGINT from a
    training forward pass; "resumed" resumes it and compares its last.pt with the straight
    one. Mode "deterministic": cudnn.benchmark off, deterministic algorithms on (the ops
    without one warn, and are listed).
    """
    size, batch_size, workers, stop_at, epochs = plan
    if mode == "deterministic":
        engine_setup = yolo.train.setup_runtime

        def deterministic_setup(*args):
            runtime = engine_setup(*args)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
            torch.use_deterministic_algorithms(True, warn_only=True)
            return runtime

        yolo.train.setup_runtime = deterministic_setup
    config = TrainConfig(
        model="tiny", run="resumed", data_root=root, train_sets=("demo:train",),
        val_set="demo:val", classes=f"{root}/demo_classes.txt", epochs=epochs,
        batch_size=batch_size, accum=1, img_size=size, eval_img_size=size, min_size=size,
        max_size=2 * size, multi_scale_every=2, workers=workers, burn_in=2, lr=1e-3,
        eval_every=2, num_vis_images=0, log_dir=f"{folder}/logs", model_dir=f"{folder}/model",
    )  # fmt: skip
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for phase in phases:
            if phase == "straight":
                fit(dataclasses.replace(config, run="straight"))
            elif phase == "interrupted":
                summary, state = fit_with_signal(config, stop_at, signal.SIGINT)
                if not summary.get("interrupted"):
                    raise RuntimeError(f"SIGINT at forward pass {stop_at} did not stop the run")
                result["stopped_at"] = f"epoch {state['epoch'] + 1}, batch {state['batch']}"
            else:
                fit(dataclasses.replace(config, resume="last"))
                runs = (Path(folder, "model", run, "last.pt") for run in ("straight", "resumed"))
                result.update(compare_checkpoints(*runs))
    messages = {str(w.message) for w in caught if "deterministic" in str(w.message)}
    result["nondeterministic_ops"] = sorted({m.split(" does not have")[0][:80] for m in messages})
    return result


def nccl_probe() -> dict:
    """Under torchrun, one process: the engine's NCCL collectives (``setup_runtime`` joins a
    process group whenever torchrun launched it, also of one process)."""
    runtime = setup_runtime("cuda", True)
    flags = [broadcast_flag(False, runtime), broadcast_flag(True, runtime)]
    model = nn.Conv2d(3, 4, 3).to(runtime.device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device])
    ddp(torch.rand(2, 3, 8, 8, device=runtime.device)).sum().backward()
    result = {"backend": dist.get_backend(), "broadcast_flag": flags, "ddp_backward": True}
    teardown_runtime(runtime)
    return result
