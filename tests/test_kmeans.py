"""kmeans.py and its engine yolo/kmeans.py: flags, files written, errors."""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import kmeans
import yolo.kmeans as engine
from utils.anchors import load_anchors, read_voc_box_sizes
from utils.demo import DEMO_CLASSES


def demo_args(demo_root: Path, out_dir: Path, *extra: str) -> list[str]:
    classes = str(demo_root / "demo_classes.txt")
    base = ["--data-root", str(demo_root), "--sets", "demo:train", "--classes", classes]
    return [*base, "--out-dir", str(out_dir), "--restarts", "3", *extra]


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        kmeans.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data-root", "--sets", "--classes", "--demo", "--k", "--restarts", "--seed"):
        assert flag in text
    for flag in ("--keep-difficult", "--out-dir", "--grid-size", "--threads"):
        assert flag in text


def test_end_to_end_on_the_demo_dataset(demo_root, tmp_path, caplog):
    out = tmp_path / "anchors"
    threads = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="yolo.kmeans"):
        assert kmeans.main(demo_args(demo_root, out, "--k", "2-4")) == 0
    assert torch.get_num_threads() == threads  # restored after the run
    names = {"kmeans.json", "iou_vs_k.png"}
    names |= {f"anchors-{k}.json" for k in (2, 3, 4)} | {f"clusters-{k}.png" for k in (2, 3, 4)}
    assert {path.name for path in out.iterdir()} == names
    summary = json.loads((out / "kmeans.json").read_text())
    wh = read_voc_box_sizes(demo_root, [("demo", "train")], DEMO_CLASSES)
    assert summary["num_boxes"] == len(wh) and summary["sets"] == ["demo:train"]
    assert [entry["k"] for entry in summary["results"]] == [2, 3, 4]
    for entry in summary["results"]:
        anchors = load_anchors(out / entry["anchors_file"])
        assert anchors.shape == (entry["k"], 2)
        torch.testing.assert_close(anchors, torch.tensor(entry["anchors"]))
        torch.testing.assert_close(anchors * 13, torch.tensor(entry["anchors_grid"]))
        assert entry["darknet_cfg"].startswith("anchors = ")
        assert len(entry["restart_ious"]) == len(entry["iterations"]) == 3
        assert 0.3 < entry["mean_iou"] <= 1
    ious = [entry["mean_iou"] for entry in summary["results"]]
    assert ious == sorted(ious)
    for name in ("clusters-3.png", "iou_vs_k.png"):
        assert Image.open(out / name).size[0] > 300
    assert "IoU %" in caplog.text and f"{100 * ious[1]:.2f}" in caplog.text


def test_one_k_writes_no_iou_plot_and_matches_the_library(demo_root, tmp_path):
    out = tmp_path / "one"
    assert kmeans.main(demo_args(demo_root, out, "--k", "3", "--seed", "4")) == 0
    assert not (out / "iou_vs_k.png").exists()
    wh = read_voc_box_sizes(demo_root, [("demo", "train")], DEMO_CLASSES)
    expected = engine.run_kmeans(wh, 3, restarts=3, seed=4).anchors
    assert torch.equal(load_anchors(out / "anchors-3.json"), expected)


def test_keep_difficult_reads_more_boxes(demo_root, tmp_path):
    counts = []
    for flag in ("--no-keep-difficult", "--keep-difficult"):
        kmeans.main(demo_args(demo_root, tmp_path / flag, "--k", "1", flag))
        counts.append(json.loads((tmp_path / flag / "kmeans.json").read_text())["num_boxes"])
    assert counts[0] < counts[1]


def test_demo_flag_uses_the_demo_train_split(demo_root, tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(
        engine, "generate_demo_dataset", lambda root: made.append(root) or demo_root
    )
    argv = ["--demo", "--data-root", "/nowhere", "--k", "2", "--out-dir", str(tmp_path)]
    assert kmeans.main([*argv, "--restarts", "2"]) == 0
    summary = json.loads((tmp_path / "kmeans.json").read_text())
    assert made == [engine.DEMO_ROOT]
    assert summary["data_root"] == str(demo_root) and summary["sets"] == ["demo:train"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "0"], "--k '0'"),
        (["--k", "5-3"], "range such as 1-15"),
        (["--k", "five"], "--k 'five'"),
        (["--k", "1-100"], "from 1 to 64"),
        (["--restarts", "0"], "--restarts must be at least 1"),
        (["--sets", "2007"], "NAME:SPLIT"),
    ],
)
def test_bad_values_exit_with_one_clear_line(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        kmeans.main(argv)
    assert message in str(exit_info.value.code)


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        kmeans.main(["--k", "5", "--clusters", "5"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --clusters" in capsys.readouterr().err


def test_user_errors_return_1_with_the_reason(demo_root, voc_writer, tmp_path, caplog):
    assert kmeans.main(["--data-root", str(tmp_path / "none"), "--out-dir", str(tmp_path)]) == 1
    assert "ImageSets/Main/trainval.txt does not exist: check --data-root" in caplog.text
    voc_writer.add("a", [("cat", (1, 1, 33, 25), 0), ("cat", (1, 1, 9, 9), 0)])
    voc_writer.write_set("trainval")
    classes = voc_writer.root / "classes.txt"
    classes.write_text("cat\n")
    few = ["--data-root", str(voc_writer.root), "--sets", "test:trainval"]
    few += ["--classes", str(classes), "--out-dir", str(tmp_path)]
    assert kmeans.main([*few, "--k", "3"]) == 1
    assert "k=3 clusters from 2 distinct box sizes" in caplog.text and "lower k" in caplog.text
    voc = ["--data-root", str(demo_root), "--sets", "demo:train", "--out-dir", str(tmp_path)]
    assert kmeans.main(voc) == 1  # the demo's classes are not VOC's: every object is skipped
    assert "no boxes found" in caplog.text and "--classes FILE" in caplog.text
    assert kmeans.main([*voc, "--strict"]) == 1
    assert "is not in the class list" in caplog.text


def test_parse_k_and_the_table():
    assert engine.parse_k("5") == [5]
    assert engine.parse_k(" 1-15 ") == list(range(1, 16))
    assert engine.parse_k("9-9") == [9]
    for spec in ("", "-3", "1-", "1-2-3", "3-1", "0-4", "a-b"):
        with pytest.raises(ValueError, match="--k"):
            engine.parse_k(spec)
    entries = [
        {"k": 5, "mean_iou": 0.6123, "anchors_grid": [[1.0, 2.0]] * 5},
        {"k": 6, "mean_iou": 0.65, "anchors_grid": [[1.5, 2.25]] * 6},
    ]
    lines = engine.format_kmeans_table(entries, 13).splitlines()
    assert lines[0].split()[:3] == ["k", "IoU", "%"]
    assert lines[1].split()[:4] == ["5", "61.23", "61.0", "1.00x2.00"]
    assert lines[2].split()[:4] == ["6", "65.00", "-", "1.50x2.25"]
    anchors = torch.tensor([[1.0, 2.0], [3.0, 4.5]]) / 13
    assert engine.darknet_anchor_line(anchors, 13) == "anchors = 1.0000,2.0000, 3.0000,4.5000"
