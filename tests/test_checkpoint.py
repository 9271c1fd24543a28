import os

import pytest
import torch

from yolo.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from yolo.config import TrainConfig, config_to_dict


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

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
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
