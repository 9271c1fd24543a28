"""yolo.report: what a run prints, including a validation set without objects (no mAP)."""

import logging
import math
from pathlib import Path

from yolo.config import TrainConfig
from yolo.report import report_end, report_epoch, resume_command
from yolo.train import TrainState


def test_an_epoch_without_a_map_is_reported_without_a_best(tmp_path, caplog, capsys):
    state = TrainState(epoch=1)
    state.history.append(
        {"epoch": 1, "loss_total": 2.5, "lr": 1e-3, "images_per_s": 9.0, "epoch_s": 12.0,
         "map_voc07": math.nan}
    )  # fmt: skip
    config = TrainConfig(run="r", epochs=1, demo=True)
    with caplog.at_level(logging.INFO):
        report_epoch(state, config, tmp_path)
    assert "epoch 1/1  loss 2.500" in caplog.text and "mAP07 nan (best none)" in caplog.text
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    report_end(state, config, tmp_path, Path("logs"))
    printed = capsys.readouterr().out
    assert "no mAP, so no best.pt" in printed
    assert f"--weights {tmp_path / 'last.pt'} --demo" in printed


def test_the_end_names_the_best_epoch_and_the_next_command(tmp_path, capsys):
    state = TrainState(epoch=2, best_map=0.5, best_epoch=1)
    state.history += [{"epoch": 1, "map_voc07": 0.5}, {"epoch": 2, "map_voc07": 0.4}]
    config = TrainConfig(model="resnet18", run="r", data_root="d", val_set="x:val")
    (tmp_path / "best.pt").write_bytes(b"")
    report_end(state, config, tmp_path, Path("logs"))
    printed = capsys.readouterr().out
    assert "best VOC07 mAP 0.5000 at epoch 1, last 0.4000" in printed
    assert f"python test_resnet18.py --weights {tmp_path / 'best.pt'} --data-root d" in printed
    (tmp_path / "best.pt").unlink()  # resumed from another run's checkpoint: its best is there
    report_end(state, config, tmp_path, Path("logs"))
    printed = capsys.readouterr().out
    assert "best.pt (best mAP)" not in printed and "not trained here, so no best.pt" in printed
    assert f"--weights {tmp_path / 'last.pt'}" in printed
    assert resume_command(TrainConfig(run="r", model_dir="m")).endswith(
        "--run-name r --resume --model-dir m"
    )
