"""bench/small_data.py's report on runs of any length and age: one evaluated epoch, none, and
an older last.pt whose history has no COCO mAP."""

import math

import torch

from bench.small_data import curves, summarise, table


def _last_pt(path, history, **config):
    torch.save({"state": {"history": history}, "config": config}, path)
    return path


def test_one_epoch_has_no_swing_and_none_is_left_out():
    one = summarise({"map_voc07": [0.4], "map_coco": [0.1], "settings": {}})
    assert one["swing"] == 0.0 and one["best"] == one["last"] == 0.4 and one["last10_sd"] == 0.0
    assert summarise({"map_voc07": [], "map_coco": [], "settings": {}}) is None


def test_an_old_run_without_coco_reads_and_reports(tmp_path):
    history = [{"epoch": 1, "map_voc07": 0.2}, {"epoch": 2}, {"epoch": 3, "map_voc07": 0.5}]
    read = curves(_last_pt(tmp_path / "last.pt", history, ema=True, ema_decay=0.9833))
    assert read["map_voc07"] == [0.2, 0.5] and all(math.isnan(c) for c in read["map_coco"])
    assert read["settings"] == {"anchors": None, "ema": True, "ema_decay": 0.9833,
                                "ema_share": None}  # fmt: skip
    row = summarise(read)
    assert row["swing"] == 0.3 and row["best_epoch"] == 2
    assert "| old | 0 | 0.500 (2) | 0.500 |" in table({("old", 0): row})
