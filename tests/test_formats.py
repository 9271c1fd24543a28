"""The --data entry point: format detection, splits per format, classes, the empty-set check,
and training on a COCO or YOLO export of the demo set exactly as on its VOC original."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import kmeans
from tests.test_train import logged, make_config
from utils.data import CocoDataset, VOCDataset, YoloDataset
from utils.demo import DEMO_CLASSES
from utils.export_dataset import export_coco, export_yolo
from utils.formats import (
    box_sizes,
    check_trainable,
    dataset_classes,
    detect_format,
    open_dataset,
    voc_classes_file,
)
from yolo.train import fit


@pytest.fixture(scope="module")
def exports(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("formats")
    sets = [("demo", "train"), ("demo", "val")]
    export_coco(demo_root, sets, DEMO_CLASSES, out / "coco")
    export_yolo(demo_root, sets, DEMO_CLASSES, out / "yolo")
    return out


def test_detect_format(demo_root, exports, tmp_path):
    coco, yolo = exports / "coco", exports / "yolo"
    assert detect_format(demo_root) == "voc" and detect_format(demo_root / "VOCdemo") == "voc"
    assert detect_format(coco) == "coco"
    assert detect_format(coco / "annotations" / "instances_val.json") == "coco"
    assert detect_format(yolo) == "yolo" and detect_format(yolo / "data.yaml") == "yolo"
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="--data-format voc"):
        detect_format(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no VOC, COCO or YOLO layout"):
        detect_format(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        detect_format(tmp_path / "nope")


def test_splits_of_each_format(demo_root, exports):
    coco, yolo = exports / "coco", exports / "yolo"
    train_json = coco / "annotations" / "instances_train.json"
    assert open_dataset(coco, "val").annotation_file.name == "instances_val.json"
    assert open_dataset(train_json, "train").annotation_file == train_json
    assert open_dataset(train_json, "val").annotation_file.name == "instances_val.json"
    val_json = coco / "annotations" / "instances_val.json"
    assert open_dataset(val_json, "val").annotation_file == val_json  # evaluating a given file
    assert isinstance(open_dataset(yolo, "val"), YoloDataset)
    assert len(open_dataset(yolo / "data.yaml", "train")) == 24
    voc = open_dataset(demo_root, "val", voc_sets=[("demo", "val")], classes=DEMO_CLASSES)
    assert isinstance(voc, VOCDataset) and len(voc) == 8
    assert len(open_dataset(demo_root / "VOCdemo", "train", classes=DEMO_CLASSES)) == 24
    forced = open_dataset(train_json, "train", data_format="coco")
    assert isinstance(forced, CocoDataset)
    assert dataset_classes(coco) == dataset_classes(yolo) == DEMO_CLASSES
    assert dataset_classes(demo_root) is None


def test_coco_val_file_missing_says_where(exports, tmp_path):
    source = exports / "coco" / "annotations" / "instances_train.json"
    shutil.copyfile(source, tmp_path / "instances_train2017.json")
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json"):
        open_dataset(tmp_path / "instances_train2017.json", "val")


def test_an_empty_training_set_names_the_mismatched_class(voc_writer, tmp_path):
    for index in range(3):
        voc_writer.add(f"im{index}", [("kangaroo", (2, 2, 20, 20), False)] * 77)
    sets = voc_writer.write_set("train")
    ds = VOCDataset(voc_writer.root, sets, ("kangaro",))
    with pytest.raises(ValueError) as error:
        check_trainable(ds, "classes.txt")
    assert str(error.value).startswith(
        "0 of 231 objects match a class name in classes.txt: 'kangaroo' is not 'kangaro'"
    )
    check_trainable(VOCDataset(voc_writer.root, sets, ("kangaroo",)))


def test_an_imported_voc_set_brings_its_classes_and_names_its_sets(voc_writer, tmp_path):
    """import_voc.py writes classes.txt beside VOC<NAME>: --data finds it without --classes, and
    a devkit folder without the sets asked for says which sets it holds."""
    for index in range(4):
        voc_writer.add(f"im{index}", [("raccoon", (2, 2, 40, 30), False)])
    voc_writer.write_set("train")
    folder = voc_writer.folder
    assert dataset_classes(folder) is None
    assert not box_sizes(open_dataset(folder, "train")).numel()  # VOC's 20: raccoon is not one
    (voc_writer.root / "classes.txt").write_text("raccoon\n")
    for path in (folder, voc_writer.root):
        assert dataset_classes(path) == ("raccoon",)
    assert len(box_sizes(open_dataset(folder, "train"))) == 4
    (folder / "classes.txt").write_text("cat\nraccoon\n")  # the set's own file comes first
    assert open_dataset(folder, "train").classes == ("cat", "raccoon")
    with pytest.raises(FileNotFoundError, match=r"VOC2007 not found .* holds the sets test:train"):
        open_dataset(voc_writer.root, "train", voc_sets=[("2007", "trainval")])
    assert kmeans.main(["--data", str(folder), "--k", "1", "--out-dir", str(tmp_path / "k")]) == 0
    assert json.loads((tmp_path / "k" / "kmeans.json").read_text())["num_boxes"] == 4
    devkit = tmp_path / "VOCdevkit"  # a devkit named VOC...: a classes.txt above it is not its
    (devkit / "VOCx" / "Annotations").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("dog\n")
    assert dataset_classes(devkit) is None and voc_classes_file(devkit) is None


def test_training_stops_before_the_first_epoch_on_a_class_typo(demo_root, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("circel\nsquar\ntriangel\ncros\nrin\n")
    config = make_config(tmp_path, demo_root, classes=str(classes), epochs=1)
    with pytest.raises(ValueError, match=r"0 of \d+ objects match .*classes\.txt: '(\w+)' is not"):
        fit(config)
    assert not list(Path(config.model_dir).rglob("*.pt"))


SMALL = {"epochs": 1, "multi_scale": False, "keep_difficult": True, "img_size": 64,
         "eval_img_size": 64, "train_sets": ("demo:val",)}  # fmt: skip


@pytest.fixture(scope="module")
def voc_run(demo_root, tmp_path_factory):
    """One epoch on the 8 val images of the VOC original: the reference."""
    config = make_config(tmp_path_factory.mktemp("voc"), demo_root, **SMALL)
    fit(config)
    return config


@pytest.mark.parametrize("kind", ["coco", "yolo"])
def test_training_on_an_export_logs_the_voc_losses(demo_root, exports, tmp_path, voc_run, kind):
    data = exports / "coco" / "annotations" / "instances_val.json"  # train and val: this file
    if kind == "yolo":
        data = tmp_path / "val.yaml"
        names = ", ".join(DEMO_CLASSES)
        data.write_text(f"path: {exports / 'yolo'}\ntrain: images/val\nval: images/val\n"
                        f"names: [{names}]\n")  # fmt: skip
    other = dataclasses.replace(make_config(tmp_path, demo_root, **SMALL), data=str(data),
                                classes=None)  # fmt: skip
    fit(other)
    for tag in ("train/loss_total", "val/map_voc07"):
        reference = logged(Path(voc_run.log_dir) / "t", tag)
        assert logged(Path(other.log_dir) / "t", tag) == reference and reference


def test_evaluation_set_keeps_targets_of_unreadable_images(exports):
    ds = open_dataset(exports / "coco", "val", keep_unreadable=True)
    assert all(not ds[i][1]["unreadable"] for i in range(2))
    assert torch.is_tensor(ds.get_target(0)["areas"])


def test_kmeans_reads_every_format_alike(demo_root, exports, tmp_path):
    common = ["--k", "2", "--restarts", "2", "--keep-difficult"]
    voc = ["--data", str(demo_root), "--sets", "demo:train", "--classes",
           str(demo_root / "demo_classes.txt")]  # fmt: skip
    runs = {"voc": voc, "coco": ["--data", str(exports / "coco")],
            "yolo": ["--data", str(exports / "yolo" / "data.yaml")]}  # fmt: skip
    anchors = {}
    for name, args in runs.items():
        assert kmeans.main([*args, *common, "--out-dir", str(tmp_path / name)]) == 0
        document = json.loads((tmp_path / name / "kmeans.json").read_text())
        anchors[name] = (document["num_boxes"], document["results"][0]["anchors_grid"])
    assert anchors["voc"] == anchors["coco"] == anchors["yolo"] and anchors["voc"][0] == 60


def test_the_suggested_test_command_reuses_data(demo_root, exports, tmp_path):
    from yolo.report import _test_command

    coco = dataclasses.replace(make_config(tmp_path, demo_root), data=str(exports / "coco"))
    assert _test_command(coco, Path("b.pt")).endswith(f"--data {exports / 'coco'}")
    voc = dataclasses.replace(make_config(tmp_path, demo_root), data=str(demo_root))
    assert _test_command(voc, Path("b.pt")).endswith("--val-set demo:val")
    folder = dataclasses.replace(voc, data=str(demo_root / "VOCdemo"))  # its own val split
    assert _test_command(folder, Path("b.pt")).endswith(f"--data {demo_root / 'VOCdemo'}")


def test_coco_classes_read_without_the_whole_file_and_with_it(tmp_path):
    folder = tmp_path / "annotations"
    folder.mkdir()
    cats = [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}]
    path = folder / "instances_train.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    assert dataset_classes(path) == ("a", "b")
    decoy = {"categories": cats, "images": [], "annotations": [], "info": {"categories": [1]}}
    path.write_text(json.dumps(decoy))
    assert dataset_classes(tmp_path) == ("a", "b")


def test_data_format_without_data_is_an_error(demo_root, tmp_path):
    config = dataclasses.replace(make_config(tmp_path, demo_root), data_format="coco")
    with pytest.raises(ValueError, match="--data-format coco needs --data PATH"):
        fit(config)
