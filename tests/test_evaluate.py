"""The test scripts end to end (yolo.testing.run_test) and every entry script's --help."""

import json
import logging
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import test_yolov2
from tests.test_metrics_devkit import (
    NUM_CLASSES,
    POWER_OF_TWO_SIZES,
    assert_equals_devkit,
    devkit_per_class,
    evaluate_pixel_set,
    pixel_set,
    to_pixel_frame,
    vocevaldet,
)
from utils.anchors import default_anchors, save_anchors
from utils.data import VOCDataset
from utils.transforms import build_eval_transform
from utils.voc import load_classes
from yolo.build import build_val_loader
from yolo.checkpoint import FORMAT, save_checkpoint
from yolo.config import TestConfig
from yolo.darknet import save_darknet_weights
from yolo.evaluate import evaluate, write_voc_results
from yolo.load import load_trained_model
from yolo.model import build_model
from yolo.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = (
    "train_yolov2.py",
    "train_resnet18.py",
    "train_resnet101.py",
    "test_yolov2.py",
    "test_resnet18.py",
    "test_resnet101.py",
    "detect.py",
    "kmeans.py",
    "export.py",
    "download_voc.py",
    "import_voc.py",
)
# a flag each script's --help must list
KEY_FLAG = {"kmeans.py": "--k ", "download_voc.py": "--mirror", "import_voc.py": "--annotations"}
METRIC_KEYS = ("map_voc07", "map_voc12", "map_coco", "ap50_coco", "ap75_coco")


class _Payload:
    """An object whose unpickling would call a function: what weights_only=True refuses."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_every_entry_script_has_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {script}")
    assert KEY_FLAG.get(script, "--weights") in text and "(default: (" not in text


@pytest.fixture(scope="module")
def demo_model(demo_root) -> torch.nn.Module:
    """A random tiny model for the demo's classes, biased to confident boxes."""
    torch.manual_seed(0)
    num_classes = len(load_classes(demo_root / "demo_classes.txt"))
    model = build_model("tiny", num_classes=num_classes).eval()
    with torch.no_grad():
        bias = model.head.conv.bias.view(5, 5 + num_classes)  # [A*(5+C)] -> [A, 5+C]
        bias[:, 4] = 2.0
    return model


def run_test_script(weights: Path, demo_root: Path, out: Path, *extra: str) -> int:
    return test_yolov2.main(
        [
            "--weights", str(weights), "--data-root", str(demo_root), "--val-set", "demo:val",
            "--img-size", "96", "--device", "cpu", "--workers", "0", "--batch-size", "4",
            "--fps-iters", "2", "--num-vis-images", "3", "--out", str(out), *extra,
        ]
    )  # fmt: skip


def test_checkpoint_end_to_end(tmp_path, demo_root, demo_model, capsys):
    classes = load_classes(demo_root / "demo_classes.txt")
    checkpoint = save_checkpoint(
        {
            "model": demo_model.state_dict(),
            "config": {"model": "tiny"},
            "classes": list(classes),
            "anchors": default_anchors().tolist(),
            "format": FORMAT,
        },
        tmp_path / "best.pt",
    )
    out = tmp_path / "out"
    voc = tmp_path / "voc"
    assert run_test_script(checkpoint, demo_root, out, "--save-voc-results", str(voc)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["device"] == "CPU" and metrics["precision"] == "fp32"
    assert metrics["fps_model"] > 0 and metrics["fps_end_to_end"] > 0
    assert (out / "pr_curves.png").read_bytes().startswith(b"\x89PNG")
    assert len(list((out / "detections").glob("*.jpg"))) == 3
    printed = capsys.readouterr().out
    assert "mean" in printed and "FPS at 96 on CPU (fp32)" in printed
    files = sorted(p.name for p in voc.iterdir())
    assert files == sorted(f"comp4_det_test_{name}.txt" for name in classes)
    rows = [line.split() for p in voc.iterdir() for line in p.read_text().splitlines()]
    assert rows, "a confident model leaves detections in the VOC files"
    for image_id, score, *corners in rows:
        x1, y1, x2, y2 = map(float, corners)
        assert len(image_id) == 6 and 0.0 < float(score) <= 1.0
        assert 1.0 <= x1 <= x2 + 1 and 1.0 <= y1 <= y2 + 1


def test_darknet_weights_give_what_the_same_checkpoint_gives(tmp_path, demo_root, demo_model):
    classes_file = demo_root / "demo_classes.txt"
    weights = tmp_path / "tiny-demo.weights"
    save_darknet_weights(demo_model, weights)
    checkpoint = save_checkpoint(
        {
            "model": demo_model.state_dict(),
            "config": {"model": "tiny"},
            "classes": list(load_classes(classes_file)),
            "anchors": default_anchors().tolist(),
            "format": FORMAT,
        },
        tmp_path / "same.pt",
    )
    darknet_args = ("--model", "tiny", "--classes", str(classes_file))
    assert run_test_script(weights, demo_root, tmp_path / "a", *darknet_args) == 0
    assert run_test_script(checkpoint, demo_root, tmp_path / "b") == 0
    from_darknet = json.loads((tmp_path / "a" / "metrics.json").read_text())
    from_checkpoint = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for key in (*METRIC_KEYS, "per_class"):
        assert from_darknet[key] == from_checkpoint[key], key


def test_a_checkpoint_keeps_its_classes_and_anchors(tmp_path, demo_model, caplog):
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("".join(f"c{index}\n" for index in range(5)))
    anchors = tmp_path / "anchors.json"
    save_anchors(default_anchors()[:3] / 2, anchors)
    weights = tmp_path / "tiny.weights"
    save_darknet_weights(build_model("tiny", num_classes=5, num_anchors=3), weights)
    _, classes, loaded, img_size = load_trained_model(
        str(weights), model_name="tiny", classes_file=str(classes_file), anchors_file=str(anchors)
    )
    assert img_size == 416  # darknet's files are evaluated at 416
    assert classes == tuple(f"c{index}" for index in range(5))
    torch.testing.assert_close(loaded, default_anchors()[:3] / 2)
    checkpoint = save_checkpoint(
        {
            "model": demo_model.state_dict(),
            "config": {"model": "tiny"},
            "classes": list("abcde"),
            "anchors": default_anchors().tolist(),
            "format": FORMAT,
        },
        tmp_path / "best.pt",
    )
    with caplog.at_level(logging.WARNING, logger="yolo.load"):
        _, classes, loaded, _ = load_trained_model(
            str(checkpoint),
            model_name="darknet19",
            classes_file=str(classes_file),
            anchors_file=str(anchors),
        )
    assert classes == tuple("abcde") and torch.equal(loaded, default_anchors())
    assert f"--classes {classes_file} ignored: checkpoint" in caplog.text
    assert f"--anchors {anchors} ignored: checkpoint" in caplog.text
    caplog.clear()
    classes_file.write_text("a\nb\nc\nd\ne\n")  # what the checkpoint holds: nothing to say
    save_anchors(default_anchors(), anchors)
    with caplog.at_level(logging.WARNING, logger="yolo.load"):
        load_trained_model(
            str(checkpoint),
            model_name="tiny",
            classes_file=str(classes_file),
            anchors_file=str(anchors),
        )
    assert "ignored" not in caplog.text


def test_unknown_classes_are_skipped_or_stop_a_strict_run(tmp_path, demo_root, caplog):
    classes = load_classes(demo_root / "demo_classes.txt")[:-1]  # without "ring"
    checkpoint = save_checkpoint(
        {
            "model": build_model("tiny", num_classes=len(classes)).state_dict(),
            "config": {"model": "tiny"},
            "classes": list(classes),
            "anchors": default_anchors().tolist(),
            "format": FORMAT,
        },
        tmp_path / "four.pt",
    )
    assert run_test_script(checkpoint, demo_root, tmp_path / "a") == 0
    assert "unknown class 'ring', skipped" in caplog.text
    assert run_test_script(checkpoint, demo_root, tmp_path / "b", "--strict") == 1
    assert "'ring', which is not in the class list" in caplog.text


def test_missing_and_unsafe_weights_are_clear_errors(tmp_path, demo_root, caplog):
    out = tmp_path / "out"
    assert test_yolov2.main(["--out", str(out)]) == 1
    assert "--weights is required" in caplog.text
    assert run_test_script(tmp_path / "nowhere.pt", demo_root, out) == 1
    assert "nowhere.pt not found" in caplog.text and "model/<run>/best.pt" in caplog.text
    assert "yolov2-voc" in caplog.text
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": _Payload()}, evil)
    assert run_test_script(evil, demo_root, out) == 1
    assert "refusing to load" in caplog.text
    assert not (out / "metrics.json").exists()


def test_voc_result_files_use_the_voc_pixel_frame_of_the_original_image(tmp_path):
    dets = torch.tensor(
        [[0.0, 0.5, 0.25, 1.0, 0.9, 1.0], [0.1, 0.1, 0.2, 0.2, 0.125, 0.0]]
    )  # normalised xyxy, score, class
    write_voc_results([("000007", (200, 400), dets)], ("a", "b"), tmp_path)
    assert (tmp_path / "comp4_det_test_b.txt").read_text() == (
        "000007 0.9 1.00 101.00 100.00 200.00\n"
    )
    assert (tmp_path / "comp4_det_test_a.txt").read_text() == (
        "000007 0.125 41.00 21.00 80.00 40.00\n"
    )


def read_voc_results(folder: Path, classes, image_ids) -> dict[int, list]:
    """Result files as the devkit's textread reads them: per class, the lines ``(image index,
    confidence, b1, b2, b3, b4)`` in file order."""
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    lines = {}
    for label, name in enumerate(classes):
        rows = (
            line.split()
            for line in (folder / f"comp4_det_test_{name}.txt").read_text().splitlines()
        )
        lines[label] = [(index[row[0]], *map(float, row[1:])) for row in rows]
    return lines


def test_perfect_tiny_detections_round_trip_to_iou_one(voc_writer, tmp_path):
    # XML -> VOCDataset -> write_voc_results -> file: the devkit's +1 IoU with the XML box is 1.
    boxes = [(5, 7, 5, 7), (10, 3, 11, 4), (20, 15, 22, 17), (30, 1, 30, 23), (1, 1, 37, 23)]
    voc_writer.add("tiny", [("cat", box, 0) for box in boxes], size=(37, 23))
    dataset = VOCDataset(voc_writer.root, voc_writer.write_set(), ("cat",))
    _, target = dataset[0]
    assert len(target["boxes"]) == len(boxes)  # 1-pixel-wide objects are objects
    dets = torch.cat([target["boxes"], torch.ones(len(boxes), 2)], 1)  # score 1, class 1
    dets[:, 5] = 0
    write_voc_results([("tiny", target["orig_size"], dets)], ("cat",), tmp_path / "out")
    lines = read_voc_results(tmp_path / "out", ("cat",), ["tiny"])[0]
    for (_, _, *bb), bbgt in zip(lines, boxes, strict=True):
        iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
        ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
        ua = (
            (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
            + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
            - iw * ih
        )
        assert iw * ih / ua == 1.0, (bb, bbgt)


def test_devkit_on_the_written_files_equals_the_evaluator(tmp_path):
    images = pixel_set(5, POWER_OF_TWO_SIZES)
    records, ids = [], [f"{i:06d}" for i in range(len(images))]
    for image_id, image in zip(ids, images, strict=True):
        width, height = image["size"]
        dets = torch.from_numpy(to_pixel_frame(image["detections"], width, height))
        records.append((image_id, (height, width), dets))
    classes = tuple(f"c{k}" for k in range(NUM_CLASSES))
    write_voc_results(records, classes, tmp_path)
    lines = read_voc_results(tmp_path, classes, ids)
    for label, want in enumerate(devkit_per_class(images)):
        if want is None:
            continue
        objects = [[row for row in image["objects"] if row[4] == label] for image in images]
        got = vocevaldet(
            [[row[:4] for row in rows] for rows in objects],
            [[bool(row[5]) for row in rows] for rows in objects],
            lines[label],
        )
        assert got[0] == want[0] and got[2:] == want[2:]  # recall, AP07, AP12
        np.testing.assert_array_equal(got[1], want[1])  # precision, NaN where the devkit has it
    assert_equals_devkit(evaluate_pixel_set(images), devkit_per_class(images), curve_tol=0.0)


def test_the_checkpoints_evaluation_size_and_letterbox(tmp_path, demo_root, demo_model, capsys):
    checkpoint = save_checkpoint(
        {
            "model": demo_model.state_dict(),
            "config": {"model": "tiny", "eval_img_size": 64},
            "classes": list(load_classes(demo_root / "demo_classes.txt")),
            "anchors": default_anchors().tolist(),
            "format": FORMAT,
        },
        tmp_path / "best.pt",
    )
    common = ["--weights", str(checkpoint), "--data-root", str(demo_root), "--val-set",
              "demo:val", "--device", "cpu", "--workers", "0", "--fps-iters", "1"]  # fmt: skip
    voc = ("--save-voc-results", str(tmp_path / "voc"))
    assert test_yolov2.main([*common, "--out", str(tmp_path / "a"), *voc]) == 0
    assert "FPS at 64 on CPU" in capsys.readouterr().out  # no --img-size: the checkpoint's
    plain = (tmp_path / "voc" / "comp4_det_test_ring.txt").read_text()
    assert test_yolov2.main([*common, "--out", str(tmp_path / "b"), "--letterbox", *voc]) == 0
    boxed = (tmp_path / "voc" / "comp4_det_test_ring.txt").read_text()
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["num_images"] == 8
    assert plain != boxed  # another input, other boxes
    for line in boxed.splitlines():  # mapped back into the original image: VOC pixel frame
        x1, y1 = (float(v) for v in line.split()[2:4])
        assert x1 >= 1.0 and y1 >= 1.0


class _Background(torch.nn.Module):
    """A detector that sees nothing: every objectness logit is -20."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.outputs = 5 * (5 + num_classes)

    def forward(self, images):
        n, _, h, w = images.shape
        raw = torch.zeros(n, 5, self.outputs // 5, h // 32, w // 32)
        raw[:, :, 4] = -20.0
        return raw.flatten(1, 2)  # [N, A, 5+C, S, S] -> [N, A*(5+C), S, S]


def test_an_unreadable_validation_image_keeps_its_objects_as_misses(voc_writer):
    voc_writer.add("good", [("cat", (1, 1, 32, 24), 0)])
    voc_writer.annotation("broken", [("cat", (5, 5, 20, 20), 0), ("cat", (30, 5, 50, 40), 0)])
    voc_writer.raw_image("broken", b"\xff\xd8 not really a jpeg")
    sets = voc_writer.write_set("val")
    config = TestConfig(data_root=str(voc_writer.root), val_set=f"{sets[0][0]}:val", workers=0)
    runtime = Runtime(torch.device("cpu"))
    loader = build_val_loader(config, ("cat",), build_eval_transform(64), workers=0,
                              runtime=runtime)  # fmt: skip
    res, _ = evaluate(_Background(1), loader, default_anchors(), runtime=runtime,
                      class_names=("cat",))  # fmt: skip
    assert res["num_images"] == 2 and res["num_ground_truths"] == 3
    assert res["unreadable_images"] == ["broken"]
