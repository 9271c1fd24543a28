import contextlib
import dataclasses
import errno
import os

import pytest
import torch

import yolo.checkpoint
from yolo.checkpoint import (
    changed_settings,
    check_resumable,
    load_checkpoint,
    resume_settings,
    save_checkpoint,
)
from yolo.config import TrainConfig
from yolo.flags import config_to_dict


class _Exploit:
    """Unpickling this would run a command: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_save_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "run" / "last.pt"
    state = {"model": {"w": torch.arange(4.0)}, "config": {"model": "tiny"}, "epoch": 3}
    save_checkpoint(state, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "config": {}, "epoch": 1}, path)

    real_open = yolo.checkpoint.atomic_open

    @contextlib.contextmanager
    def failing_midway(path, mode):
        with real_open(path, mode) as handle:
            handle.write(b"partial")
            raise OSError(errno.EIO, "input/output error")
            yield handle

    monkeypatch.setattr(yolo.checkpoint, "atomic_open", failing_midway)
    with pytest.raises(OSError, match="input/output error"):
        save_checkpoint({"model": {}, "config": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot read checkpoint"),
        (b"not a zip file at all", "cannot read checkpoint"),
    ],
)
def test_unreadable_files_give_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)


def test_foreign_or_missing_files(tmp_path):
    path = tmp_path / "weights_only.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_check_names_every_mismatch():
    anchors = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    saved = TrainConfig(model="tiny")
    ckpt = {"config": config_to_dict(saved), "classes": ["a", "b"], "anchors": anchors.tolist()}
    check_resumable(ckpt, saved, ("a", "b"), anchors, "x.pt")  # the same run: no error
    other = TrainConfig(model="darknet19", optimizer="adamw")
    with pytest.raises(ValueError, match=r"x\.pt.*model tiny.*optimizer sgd.*classes.*anchors"):
        check_resumable(ckpt, other, ("a", "c"), anchors * 2, "x.pt")
    del ckpt["config"]["optimizer"]  # written before --optimizer existed: SGD
    check_resumable(ckpt, saved, ("a", "b"), anchors, "x.pt")


def test_a_full_disk_is_one_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}, "config": {}, "epoch": 1}, path)

    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    @contextlib.contextmanager
    def full(*args, **kwargs):
        yield FullDisk()

    monkeypatch.setattr(yolo.checkpoint, "atomic_open", full)
    with pytest.raises(OSError) as info:
        save_checkpoint({"model": {"w": torch.ones(1000)}, "config": {}, "epoch": 2}, path)
    message = info.value.strerror
    assert info.value.errno == errno.ENOSPC and str(path) in message
    assert "disk is full" in message and "MB needed" in message and "MB free" in message
    assert "--model-dir" in message and "\n" not in message
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


def test_checkpoints_with_non_finite_weights_are_refused(tmp_path):
    path = tmp_path / "diverged.pt"
    weights = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")])}
    save_checkpoint({"model": weights, "config": {}}, path)
    with pytest.raises(ValueError, match=r"diverged\.pt holds non-finite weights .* in b"):
        load_checkpoint(path)


def test_checkpoints_before_grid_anchors_are_converted_and_said_so(tmp_path, caplog):
    path = tmp_path / "old.pt"
    grid = [[1.3221, 1.73145], [3.19275, 4.00944]]
    fractions = [[w / 13, h / 13] for w, h in grid]
    weights = {"fuse.conv.weight": torch.ones(1), "head.conv.bias": torch.zeros(1)}
    save_checkpoint({"model": weights, "config": {}, "anchors": fractions}, path)
    ckpt = load_checkpoint(path)
    torch.testing.assert_close(torch.tensor(ckpt["anchors"]), torch.tensor(grid))
    assert sorted(ckpt["model"]) == ["head.conv.bias", "head.fuse.conv.weight"]
    assert ckpt["anchors_unit"] == "grid" and "read x13 as grid cells" in caplog.text
    caplog.clear()
    save_checkpoint({"model": {}, "config": {}, "anchors": grid, "format": 2}, path)
    assert load_checkpoint(path)["anchors"] == grid and not caplog.text


def test_resume_takes_the_runs_own_settings_and_only_the_flags_given(tmp_path):
    saved = TrainConfig(model="tiny", run="r", epochs=30, lr=0.01, model_dir=str(tmp_path))
    save_checkpoint({"model": {}, "config": config_to_dict(saved)}, tmp_path / "r" / "last.pt")
    preset = TrainConfig(run="r", model_dir=str(tmp_path), resume="last", workers=2)
    config = resume_settings(preset, frozenset({"run", "model_dir", "resume", "workers"}))
    assert (config.model, config.epochs, config.lr) == ("tiny", 30, 0.01)
    assert config.workers == 2 and config.resume == "last"
    more = resume_settings(
        dataclasses.replace(preset, epochs=40), frozenset({"run", "model_dir", "resume", "epochs"})
    )
    assert more.epochs == 40 and more.lr == 0.01
    assert changed_settings(saved, more) == "--epochs 30 -> 40"
    assert resume_settings(TrainConfig(), frozenset()) == TrainConfig()  # no --resume


def test_a_class_list_refusal_names_the_names_that_differ():
    anchors = torch.ones(5, 2)
    saved = TrainConfig(model="tiny")
    classes = [f"class{i}" for i in range(9)]
    ckpt = {"config": config_to_dict(saved), "classes": classes, "anchors": anchors.tolist()}
    typo = (*classes[:7], "clas7", classes[8])  # the first five names agree
    with pytest.raises(ValueError, match=r"have \['class7'\] where this run's 9 have \['clas7'\]"):
        check_resumable(ckpt, saved, typo, anchors, "x.pt")
    swapped = (*classes[:6], classes[7], classes[6], classes[8])
    with pytest.raises(ValueError, match=r"another order \(position 7: 'class6' vs 'class7'\)"):
        check_resumable(ckpt, saved, swapped, anchors, "x.pt")
