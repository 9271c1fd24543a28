"""Faults around a training run that must not cost it: logging that cannot be written, resumes
with nothing to train or no checkpoint, starts that fail, a full disk at the first save, and a
resumed epoch's loss. Runs on 16 small training images, 1-2 epochs of tiny YOLOv2."""

import errno
import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch

import train_yolov2
import yolo.build
import yolo.checkpoint
import yolo.report
from utils.demo import generate_demo_dataset
from yolo.checkpoint import load_checkpoint, save_checkpoint
from yolo.config import TrainConfig
from yolo.train import fit

FLAGS = {
    "model": "tiny",
    "train_sets": ("demo:train",),
    "val_set": "demo:val",
    "img_size": 128,
    "eval_img_size": 128,
    "multi_scale": False,
    "optimizer": "adamw",
    "batch_size": 4,
    "accum": 1,
    "workers": 0,
    "device": "cpu",
    "burn_in": 2,
    "num_vis_images": 1,
}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t16")
    return generate_demo_dataset(root, num_train=16, num_val=4, min_size=64, max_size=128)


def small_config(tmp_path: Path, root: Path, **overrides) -> TrainConfig:
    values = {**FLAGS, "run": "t", "epochs": 1, "data_root": str(root),
              "classes": str(root / "demo_classes.txt"), "log_dir": str(tmp_path / "logs"),
              "model_dir": str(tmp_path / "model")}  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def argv_of(config: TrainConfig) -> list[str]:
    """The command-line flags that rebuild ``config`` over train_yolov2.py's preset."""
    args = []
    for name, value in vars(config).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def at_training_batch(monkeypatch, batch: int, action) -> None:
    """Call ``action()`` inside the training forward pass number ``batch``."""
    build, calls = yolo.build.build_train_model, {"n": 0}

    def hook(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == batch:
                action()

    def patched(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(yolo.build, "build_train_model", patched)


def warnings_naming(caplog, path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and str(path) in r.getMessage()]  # fmt: skip


def test_log_dir_removed_during_training_is_reported_once(
    tmp_path, small_root, monkeypatch, caplog, capfd
):
    config = small_config(tmp_path, small_root, epochs=2)
    log_dir = tmp_path / "logs" / "t"
    at_training_batch(monkeypatch, 2, lambda: shutil.rmtree(log_dir))
    with caplog.at_level(logging.INFO):
        summary = fit(config)
    assert summary["finished"] and summary["exit_code"] == 0
    assert (tmp_path / "model/t/last.pt").is_file() and (tmp_path / "model/t/best.pt").is_file()
    assert load_checkpoint(tmp_path / "model/t/last.pt")["state"]["epoch"] == 2
    (warning,) = warnings_naming(caplog, log_dir)
    assert "training goes on" in warning and "\n" not in warning
    assert "Traceback" not in capfd.readouterr().err  # not even from tensorboard's thread


def test_full_disk_under_the_logs_and_results_png_exits_0(
    tmp_path, small_root, monkeypatch, caplog, capsys
):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from tensorboard.summary.writer.record_writer import RecordWriter

    monkeypatch.setattr(RecordWriter, "write", full)
    monkeypatch.setattr(yolo.report, "save_figure", full)
    config = small_config(tmp_path, small_root)
    with caplog.at_level(logging.INFO):
        assert train_yolov2.main(argv_of(config)) == 0
    assert "finished 1 epochs of run t" in capsys.readouterr().out
    assert len(warnings_naming(caplog, tmp_path / "logs/t")) == 1
    (warning,) = warnings_naming(caplog, tmp_path / "model/t/results.png")
    assert "No space left on device" in warning
    assert (tmp_path / "model/t/last.pt").is_file()


def test_resume_of_another_runs_checkpoint_with_nothing_to_train(
    tmp_path, small_root, caplog, capsys
):
    fit(small_config(tmp_path, small_root))
    other = tmp_path / "model/t/last.pt"
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        summary = fit(small_config(tmp_path, small_root, run="u", resume=str(other)))
    assert summary["exit_code"] == 0 and "best.pt" not in capsys.readouterr().out
    (line,) = [m for m in caplog.messages if "nothing to train" in m]
    assert str(other) in line and "raise --epochs above 1" in line
    assert not (tmp_path / "model/u").exists() and not (tmp_path / "logs/u").exists()


def test_a_failed_start_leaves_no_run_folders(tmp_path, small_root):
    config = small_config(tmp_path, small_root, data_root=str(tmp_path / "nowhere"))
    with pytest.raises((OSError, ValueError)):
        fit(config)
    assert not (tmp_path / "model").exists() and not (tmp_path / "logs").exists()
    (tmp_path / "model/t").mkdir(parents=True)  # a folder of the user's stays
    with pytest.raises((OSError, ValueError)):
        fit(config)
    assert (tmp_path / "model/t").is_dir()
    assert not (tmp_path / "logs").exists()


def test_resume_without_a_checkpoint_is_one_line_after_the_temp_files_go(
    tmp_path, small_root, caplog
):
    orphan = tmp_path / "model/t/.last.pt.x1y2.tmp"  # a first save killed midway
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"partial")
    config = small_config(tmp_path, small_root, resume="last")
    assert train_yolov2.main(argv_of(config)) == 1
    assert not orphan.exists()
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "--resume" in error and "without --resume" in error and "\n" not in error


def test_a_first_save_on_a_full_disk_does_not_promise_a_previous_checkpoint(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(yolo.checkpoint, "atomic_open", full)
    state = {"model": {"w": torch.zeros(2)}, "config": {}}
    with pytest.raises(OSError, match="start again") as first:
        save_checkpoint(state, tmp_path / "last.pt")
    assert "intact" not in str(first.value)
    (tmp_path / "last.pt").write_bytes(b"an earlier checkpoint")
    with pytest.raises(OSError, match="the previous checkpoint is intact"):
        save_checkpoint(state, tmp_path / "last.pt")


def test_a_resumed_epoch_logs_the_loss_of_all_its_steps(tmp_path, small_root, monkeypatch):
    straight = small_config(tmp_path / "a", small_root)
    fit(straight)
    expected = load_checkpoint(tmp_path / "a/model/t/last.pt")["state"]["history"][0]
    config = small_config(tmp_path / "b", small_root)
    at_training_batch(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGINT))
    assert fit(config)["interrupted"]
    cut = load_checkpoint(tmp_path / "b/model/t/last.pt")["state"]
    assert (cut["batch"], cut["loss_steps"]) == (3, 3)  # stopped in the middle of 4 steps
    monkeypatch.undo()
    fit(small_config(tmp_path / "b", small_root, resume="last"))
    resumed = load_checkpoint(tmp_path / "b/model/t/last.pt")["state"]
    assert resumed["history"][0]["loss_total"] == expected["loss_total"]
    assert {k: v for k, v in resumed["history"][0].items() if k.startswith("loss_")} == {
        k: v for k, v in expected.items() if k.startswith("loss_")
    }
    assert resumed["loss_sums"] == {} and resumed["loss_steps"] == 0


def test_a_flipped_byte_in_a_tensor_is_one_line_naming_the_file(tmp_path):
    marker = torch.full((64,), 1.2345)  # bytes that are easy to find in the file
    state = {"model": {"w": marker, "b": torch.zeros(3, dtype=torch.bfloat16)}, "config": {},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}}  # fmt: skip
    path = save_checkpoint(state, tmp_path / "last.pt")
    assert torch.equal(load_checkpoint(path)["model"]["w"], marker)
    data = bytearray(path.read_bytes())
    data[data.find(marker.numpy().tobytes()) + 10] ^= 0x01
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt") as info:
        load_checkpoint(tmp_path / "flipped.pt")
    assert str(tmp_path / "flipped.pt") in str(info.value) and "\n" not in str(info.value)
    # the settings alone (tensors mapped, not read) are still readable
    assert load_checkpoint(tmp_path / "flipped.pt", weights=False)["config"] == {}


def test_checksum_is_of_the_tensors_in_a_fixed_order_and_old_checkpoints_load(tmp_path):
    from yolo.checkpoint import tensor_checksum

    a = {"model": {"x": torch.ones(2), "y": torch.zeros(2)}, "rng": [torch.arange(3)]}
    b = {"rng": [torch.arange(3)], "model": {"y": torch.zeros(2), "x": torch.ones(2)}}
    assert tensor_checksum(a) == tensor_checksum(b)  # insertion order does not matter
    for changed in (
        {**a, "model": {"x": torch.ones(2), "y": torch.zeros(2, dtype=torch.float64)}},
        {**a, "model": {"x": torch.ones(2), "y": torch.zeros(1, 2)}},
        {**a, "model": {"y": torch.ones(2), "x": torch.zeros(2)}},
        {**a, "rng": [torch.arange(3), torch.arange(0)]},
    ):
        assert tensor_checksum(changed) != tensor_checksum(a)
    old = tmp_path / "old.pt"
    torch.save({"model": {"x": torch.ones(2)}, "config": {}, "format": 2}, old)  # no checksum
    assert torch.equal(load_checkpoint(old)["model"]["x"], torch.ones(2))
