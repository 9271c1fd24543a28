"""The training engine end to end on a tiny demo set: files, resume, signals, NaN, DDP.

Sized for speed: 8 training images in batches of 4 (2 steps an epoch) made at 96 pixels (where
the data transforms' rounding can depend on the thread count), multi-scale 64..96, 2 validation
images, the tiny model, one torch thread (conftest) but where the thread count is the point.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import yolo.build
import yolo.epoch
import yolo.train
from utils.data import VOCDataset
from utils.demo import generate_demo_dataset
from yolo.checkpoint import load_checkpoint
from yolo.config import TrainConfig
from yolo.rundir import RunLock
from yolo.train import fit

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """An object whose unpickling would call a function: what weights_only=True refuses."""

    def __reduce__(self):
        return (print, ("this must never run",))


def make_config(tmp_path: Path, demo_root: Path, **overrides) -> TrainConfig:
    values = {
        "model": "tiny",
        "run": "t",
        "data_root": str(demo_root),
        "train_sets": ("demo:train",),
        "val_set": "demo:val",
        "classes": str(demo_root / "demo_classes.txt"),
        "epochs": 2,
        "batch_size": 4,
        "accum": 1,
        "img_size": 96,
        "eval_img_size": 64,
        "min_size": 64,
        "max_size": 96,
        "multi_scale_every": 2,
        "workers": 0,
        "burn_in": 2,
        "lr": 1e-3,
        "device": "cpu",
        "num_vis_images": 1,
        "log_dir": str(tmp_path / "logs"),
        "model_dir": str(tmp_path / "model"),
    }
    values.update(overrides)
    return TrainConfig(**values)


def logged(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """8 training and 2 validation images of 64..96 pixels (this module's own, smaller set)."""
    root = tmp_path_factory.mktemp("train_demo")
    return generate_demo_dataset(root, num_train=8, num_val=2, min_size=64, max_size=96, seed=0)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, demo_root):
    """Two epochs without interruption: the reference for the resume tests."""
    tmp_path = tmp_path_factory.mktemp("straight")
    config = make_config(tmp_path, demo_root)
    summary = fit(config)
    return config, summary


def test_two_epochs_write_logs_checkpoints_and_metrics(straight_run):
    config, summary = straight_run
    run_dir = Path(config.model_dir) / config.run
    assert summary["finished"] and not summary["interrupted"]
    assert {p.name for p in run_dir.iterdir()} >= {"last.pt", "best.pt", "config.json"}
    assert json.loads((run_dir / "config.json").read_text())["model"] == "tiny"
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["state"]["epoch"] == 2 and ckpt["finished"]
    assert ckpt["state"]["iteration"] == 4  # 8 images / batch 4, two epochs
    assert ckpt["classes"] == Path(config.classes).read_text().split()
    assert 0.0 <= ckpt["state"]["best_map"] <= 1.0
    log_dir = Path(config.log_dir) / config.run
    losses = logged(log_dir, "train/loss_total")
    assert [step for step, _ in losses] == list(range(4))
    for tag in ("val/map_voc07", "val/map_voc12", "val/map_coco", "train/lr", "time/epoch_s"):
        assert logged(log_dir, tag), tag
    sizes = {value for _, value in logged(log_dir, "train/img_size")}
    assert sizes <= {64.0, 96.0}
    assert logged(log_dir, "train/num_dropped")
    history = ckpt["state"]["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["loss_total"] > 0 and 0 <= row["map_voc07"] <= 1 for row in history)
    assert (run_dir / "results.png").read_bytes().startswith(b"\x89PNG")
    best = load_checkpoint(run_dir / "best.pt")["state"]
    assert best["best_map"] == ckpt["state"]["best_map"] == max(r["map_voc07"] for r in history)
    assert best["epoch"] == ckpt["state"]["best_epoch"]


def test_loss_goes_down_on_a_fixed_batch(tmp_path, demo_root):
    # the 2 val images as the only batch, without augmentation: the same batch every step
    config = make_config(
        tmp_path, demo_root, train_sets=("demo:val",), epochs=6, burn_in=1, eval_every=6,
        multi_scale=False, jitter=0.0, hue=0.0, saturation=1.0, exposure=1.0, flip=0.0,
    )  # fmt: skip
    fit(config)
    losses = [value for _, value in logged(Path(config.log_dir) / "t", "train/loss_total")]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses


def test_resume_is_exact(tmp_path, demo_root, straight_run, caplog):
    reference, _ = straight_run
    config = make_config(tmp_path, demo_root, epochs=1)
    fit(config)
    summary = fit(dataclasses.replace(config, epochs=2, resume="last"))
    assert "changed settings: --epochs 1 -> 2" in caplog.text
    assert summary["finished"]
    assert_same_weights(
        weights_of(tmp_path / "model/t/last.pt"),
        weights_of(Path(reference.model_dir) / "t/last.pt"),
    )
    ours = logged(tmp_path / "logs/t", "train/loss_total")
    theirs = logged(Path(reference.log_dir) / "t", "train/loss_total")
    assert ours == theirs  # same values, each step once


def _hook_training_model(monkeypatch, hook) -> None:
    """Register the forward ``hook`` on every model a training run builds."""
    build = yolo.build.build_train_model

    def patched(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(yolo.build, "build_train_model", patched)


def _signal_at_batch(monkeypatch, batch: int, signum: int) -> None:
    """Deliver ``signum`` from inside the training forward pass number ``batch``."""
    calls = {"n": 0}

    def hook(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == batch:
                signal.raise_signal(signum)

    _hook_training_model(monkeypatch, hook)


@pytest.mark.parametrize("signum", [signal.SIGHUP])  # SIGINT: test_cli, the batch-size test
def test_signal_saves_and_resume_mid_epoch_is_exact(
    tmp_path, demo_root, straight_run, monkeypatch, signum, caplog
):
    reference, _ = straight_run
    config = make_config(tmp_path, demo_root)
    _signal_at_batch(monkeypatch, batch=3, signum=signum)
    summary = fit(config)
    assert summary["interrupted"] and summary["exit_code"] == 128 + signum
    state = load_checkpoint(tmp_path / "model/t/last.pt")["state"]
    assert (state["epoch"], state["batch"], state["iteration"]) == (1, 1, 3)
    assert state["epoch_images"] == 4
    command = caplog.text.split("Resume with:\n")[1].split("\n")[0].split()
    assert command[2:] == ["--run-name", "t", "--resume", "--model-dir", config.model_dir]
    monkeypatch.undo()
    orphan = tmp_path / "model/t/.last.pt.x1y2.tmp"  # what a write killed midway leaves
    orphan.write_bytes(b"partial")
    fit(dataclasses.replace(config, resume="last"))
    assert not orphan.exists()
    assert_same_weights(
        weights_of(tmp_path / "model/t/last.pt"),
        weights_of(Path(reference.model_dir) / "t/last.pt"),
    )
    assert logged(tmp_path / "logs/t", "train/loss_total") == logged(
        Path(reference.log_dir) / "t", "train/loss_total"
    )
    # epoch 1 ran whole; epoch 2 was cut in two, so it has no epoch time
    assert [step for step, _ in logged(tmp_path / "logs/t", "time/epoch_s")] == [2]


def test_non_finite_loss_stops_without_touching_checkpoints(tmp_path, demo_root, monkeypatch):
    config = make_config(tmp_path, demo_root)
    calls = {"n": 0}

    def poison(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return output * float("nan")
        return output

    _hook_training_model(monkeypatch, poison)
    with pytest.raises(FloatingPointError, match=r"iteration 2 .*epoch 2") as info:
        fit(config)
    assert "nan" in str(info.value).lower()
    assert load_checkpoint(tmp_path / "model/t/last.pt")["state"]["epoch"] == 1


def test_resume_refuses_other_classes_and_reports_finished_runs(
    tmp_path, demo_root, straight_run, caplog
):
    reference, _ = straight_run
    other = tmp_path / "classes.txt"
    other.write_text("a\nb\nc\nd\ne\n")
    with pytest.raises(ValueError, match=r"cannot resume .* classes"):
        fit(dataclasses.replace(reference, resume="last", classes=str(other)))
    with caplog.at_level("INFO"):
        summary = fit(dataclasses.replace(reference, resume="last"))
    assert summary["finished"] and "already finished 2 epochs" in caplog.text


def test_a_new_run_never_overwrites_an_existing_one(straight_run):
    reference, _ = straight_run
    last = Path(reference.model_dir) / reference.run / "last.pt"
    before = last.read_bytes()
    with pytest.raises(FileExistsError, match=r"--resume.*--run NAME"):
        fit(reference)
    assert last.read_bytes() == before


def test_weights_flag_refuses_unsafe_checkpoints(tmp_path, demo_root):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": _Payload()}, evil)
    with pytest.raises(ValueError, match="refusing to load"):
        fit(make_config(tmp_path, demo_root, weights=str(evil)))


@pytest.mark.slow
def test_ddp_with_two_gloo_processes(tmp_path, demo_root):
    config = make_config(tmp_path, demo_root, epochs=1, batch_size=2)
    args = []  # the flags that rebuild ``config`` over the script's preset
    for name, value in dataclasses.asdict(config).items():
        flag = "--run-name" if name == "run" else f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple | list):
            args += [flag, *map(str, value)]
        elif value is not None:
            args.append(f"{flag}={value}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train_yolov2.py"),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(tmp_path / "model/t/last.pt")["state"]
    # 8 images over 2 ranks: 4 each, batch 2 -> 2 batches per rank, 8 images seen in all
    assert (state["epoch"], state["iteration"], state["seen"]) == (1, 2, 8)
    assert logged(tmp_path / "logs/t", "val/map_voc07")


def _run_killed(tmp_path: Path, demo_root: Path, after: str) -> subprocess.CompletedProcess:
    """Train one epoch in a subprocess that kill -9s itself right after writing ``after``."""
    driver = f"""
import os, signal
from pathlib import Path
import yolo.train
from tests.test_train import make_config
write = yolo.train.save_checkpoint
def save(state, path):
    write(state, path)
    if Path(path).name == {after!r}:
        os.kill(os.getpid(), signal.SIGKILL)
yolo.train.save_checkpoint = save
yolo.train.fit(make_config(Path({str(tmp_path)!r}), Path({str(demo_root)!r}), epochs=1))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", driver], cwd=REPO, env=env, capture_output=True, timeout=240
    )


def test_kill_between_best_and_last_keeps_the_pair_consistent(tmp_path, demo_root):
    result = _run_killed(tmp_path, demo_root, after="best.pt")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    run_dir = tmp_path / "model/t"
    last = load_checkpoint(run_dir / "last.pt")["state"]
    assert last["epoch"] == 1 and last["eval_pending"] and last["best_map"] is None
    summary = fit(make_config(tmp_path, demo_root, epochs=1, resume="last"))
    assert summary["finished"]
    last, best = (load_checkpoint(run_dir / name) for name in ("last.pt", "best.pt"))
    assert not last["state"]["eval_pending"] and last["finished"]
    assert last["state"]["best_map"] == best["state"]["best_map"] == summary["best_map"]
    assert_same_weights(last["model"], best["model"])  # one epoch: the best is the last


def test_sigterm_during_evaluation_saves_the_trained_epoch(
    tmp_path, demo_root, straight_run, monkeypatch
):
    reference, _ = straight_run
    config = make_config(tmp_path, demo_root)
    evaluate = yolo.train.evaluate

    def interrupted_evaluation(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(yolo.train, "evaluate", interrupted_evaluation)
    summary = fit(config)
    assert summary["interrupted"] and summary["exit_code"] == 143
    ckpt = load_checkpoint(tmp_path / "model/t/last.pt")
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["eval_pending"]
    assert not (tmp_path / "model/t/best.pt").exists()
    monkeypatch.undo()
    fit(dataclasses.replace(config, resume="last"))
    assert_same_weights(
        weights_of(tmp_path / "model/t/last.pt"),
        weights_of(Path(reference.model_dir) / "t/last.pt"),
    )
    ours = load_checkpoint(tmp_path / "model/t/last.pt")["state"]["history"]
    theirs = load_checkpoint(Path(reference.model_dir) / "t/last.pt")["state"]["history"]
    assert [row["map_voc07"] for row in ours] == [row["map_voc07"] for row in theirs]


def test_weights_made_non_finite_by_a_step_are_never_saved(tmp_path, demo_root, monkeypatch):
    build = yolo.build.build_training

    def patched(*args, **kwargs):
        model, criterion, optimizer, scaler = build(*args, **kwargs)
        steps = {"n": 0}

        def poison(optimizer, *_):
            steps["n"] += 1
            if steps["n"] == 2:  # the epoch's last step: before the fix, saved and evaluated
                next(model.parameters()).data.fill_(float("inf"))

        optimizer.register_step_post_hook(poison)
        return model, criterion, optimizer, scaler

    monkeypatch.setattr(yolo.train, "build_training", patched)
    with pytest.raises(FloatingPointError, match=r"made the weights non-finite at iteration 1"):
        fit(make_config(tmp_path, demo_root))
    assert not list((tmp_path / "model/t").glob("*.pt"))


def test_a_second_run_in_the_same_folder_stops_at_once(tmp_path, demo_root):
    config = make_config(tmp_path, demo_root)
    with RunLock(tmp_path / "model/t"), pytest.raises(FileExistsError, match=r"in use by pid"):
        fit(config)
    assert not (tmp_path / "model/t/last.pt").exists()


def test_resume_mid_epoch_with_another_batch_size_trains_the_right_images(
    tmp_path, demo_root, monkeypatch
):
    # a dead run's events (no checkpoint): a fresh start must not append to them
    with SummaryWriter(tmp_path / "logs/t") as writer:
        for step in range(8):
            writer.add_scalar("train/loss_total", 999.0, step)
    config = make_config(tmp_path, demo_root, eval_every=2)
    _signal_at_batch(monkeypatch, batch=1, signum=signal.SIGINT)
    fit(config)
    assert load_checkpoint(tmp_path / "model/t/last.pt")["state"]["epoch_images"] == 4
    monkeypatch.undo()
    fit(dataclasses.replace(config, resume="last", batch_size=2))
    state = load_checkpoint(tmp_path / "model/t/last.pt")["state"]
    # epoch 1: 1 step of 4 images, then the other 4 images in 2 steps of 2; epoch 2: 4 steps
    assert (state["seen"], state["iteration"]) == (16, 7)
    steps = [step for step, _ in logged(tmp_path / "logs/t", "train/loss_total")]
    assert steps == list(range(7))
    assert 999.0 not in {value for _, value in logged(tmp_path / "logs/t", "train/loss_total")}


def test_a_killed_data_worker_saves_the_run_and_says_how_to_resume(
    tmp_path, demo_root, straight_run, monkeypatch
):
    reference, _ = straight_run
    config = make_config(tmp_path, demo_root, workers=1)
    original = VOCDataset.__getitem__
    calls = {"n": 0}

    def dying(self, key):  # runs in the worker process, which inherits the patch by fork
        calls["n"] += 1
        if calls["n"] == 7:  # in the epoch's second batch
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key)

    monkeypatch.setattr(VOCDataset, "__getitem__", dying)
    with pytest.raises(ChildProcessError, match=r"worker.*resume with fewer workers.*--workers 1$"):
        fit(config)
    state = load_checkpoint(tmp_path / "model/t/last.pt")["state"]  # at the last optimizer step
    assert state["epoch"] == 0 and state["iteration"] == state["batch"] < 2
    assert state["epoch_images"] == 4 * state["batch"]
    monkeypatch.undo()
    fit(dataclasses.replace(config, resume="last", workers=1))  # as told: never --workers 0
    assert_same_weights(
        weights_of(tmp_path / "model/t/last.pt"),
        weights_of(Path(reference.model_dir) / "t/last.pt"),
    )


def test_workers_do_not_change_the_weights(tmp_path, demo_root, two_torch_threads):
    # a worker makes its batches on one torch thread; this process trains on two, and without
    # workers it made them on two as well: pixels a last bit apart, weights visibly apart
    last = {}
    for workers in (0, 1):
        config = make_config(tmp_path / str(workers), demo_root, epochs=1, batch_size=8, burn_in=0)
        fit(dataclasses.replace(config, workers=workers))  # one step of the 8 images, at --lr
        last[workers] = weights_of(tmp_path / str(workers) / "model/t/last.pt")
    assert_same_weights(last[0], last[1])


def test_augmentation_on_the_device_trains_as_on_the_cpu_and_resumes_exactly(
    tmp_path, demo_root, monkeypatch
):
    """--augment-on device: the same losses as the per-image path (to float rounding) at a
    fixed size, and a resumed run equal to an uninterrupted one, bit for bit."""
    batched = []
    augment_batch = yolo.epoch.augment_batch
    monkeypatch.setattr(
        yolo.epoch, "augment_batch", lambda *a: batched.append(1) or augment_batch(*a)
    )
    runs = {}
    for name, where, epochs in (("cpu", "cpu", 2), ("device", "device", 2), ("split", "device", 1)):
        config = make_config(tmp_path / name, demo_root, augment_on=where, multi_scale=False,
                             epochs=epochs)  # fmt: skip
        fit(config)
        runs[name] = config
    fit(dataclasses.replace(runs["split"], epochs=2, resume="last"))
    assert_same_weights(
        *(weights_of(tmp_path / name / "model/t/last.pt") for name in ("device", "split"))
    )
    cpu, device = (logged(tmp_path / n / "logs/t", "train/loss_total") for n in ("cpu", "device"))
    assert [step for step, _ in cpu] == [step for step, _ in device] == list(range(4))
    assert [v for _, v in device] == pytest.approx([v for _, v in cpu], rel=1e-4)
    assert len(batched) == 4 + 2 + 2  # every step of the device runs, none of the cpu run
