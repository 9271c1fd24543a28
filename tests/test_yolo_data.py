"""YoloDataset: data.yaml forms, split entries, label paths, bad lines, plain folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from utils.coco import BadDataset
from utils.data import YoloDataset
from utils.yolotxt import label_path, load_data_yaml


def _image(path, size=(64, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def _labels(image, text):
    path = label_path(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_label_path_replaces_the_last_images_folder(tmp_path):
    image = tmp_path / "images" / "set" / "images" / "a.b.jpg"
    assert label_path(image) == tmp_path / "images" / "set" / "labels" / "a.b.txt"


@pytest.mark.parametrize(
    "names",
    ["names: [cat, 'dog']\n", "names:\n  - cat\n  - dog\n", "names:\n  0: cat\n  1: 'dog'\n",
     "names: {0: cat, 1: dog}\n"],
)  # fmt: skip
def test_yaml_name_forms(tmp_path, names):
    _image(tmp_path / "ds" / "images" / "train" / "a.jpg")
    yaml = tmp_path / "data.yaml"
    head = "# a comment\npath: ds  # root\ntrain: images/train\nval: images/train\n"
    yaml.write_text(head + names)
    config = load_data_yaml(yaml)
    assert config["names"] == ("cat", "dog") and config["root"] == tmp_path / "ds"
    assert YoloDataset(yaml).classes == ("cat", "dog")


def test_boxes_negatives_and_split_entries(tmp_path):
    a = _image(tmp_path / "images" / "train" / "a.jpg")
    _image(tmp_path / "images" / "train" / "sub" / "b.png", size=(10, 20))
    c = _image(tmp_path / "more" / "images" / "c.jpg")
    _labels(a, "1 0.5 0.5 0.5 0.25\n0 0.1 0.1 0.2 0.2\n")  # the second is clamped
    _labels(c, "0 0.25 0.75 0.5 0.5\n")
    (tmp_path / "list.txt").write_text(f"{c}\n./images/train/a.jpg\n")
    (tmp_path / "data.yaml").write_text(
        "train: images/train\nval: list.txt\ntest: [list.txt, images/train/sub]\nnames: [x, y]\n"
    )
    train = YoloDataset(tmp_path / "data.yaml", "train")
    assert [train.get_target(i)["image_id"] for i in range(2)] == ["a", "b"]
    image, target = train[0]
    assert image.size == (64, 32) and target["orig_size"] == (32, 64)
    want = torch.tensor([[0.25, 0.375, 0.75, 0.625], [0, 0, 0.2, 0.2]])
    assert torch.equal(target["boxes"], want)
    assert target["labels"].tolist() == [1, 0] and target["difficult"].tolist() == [False, False]
    assert target["areas"].tolist() == pytest.approx([0.5 * 64 * 0.25 * 32, 0.2 * 64 * 0.2 * 32])
    assert train.get_target(1)["boxes"].shape == (0, 4)  # no label file: a negative
    val = YoloDataset(tmp_path / "data.yaml", "val")
    assert [val.get_target(i)["image_id"] for i in range(2)] == ["c", "a"]
    assert len(YoloDataset(tmp_path / "data.yaml", "test")) == 3


def test_bad_lines_are_counted(tmp_path, caplog):
    a = _image(tmp_path / "images" / "a.jpg")
    _labels(a, "0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\nx 0.5 0.5 0.2 0.2\n"
               "0 1.5 0.5 0.2 0.2\n0 0.5 0.5 -0.2 0.2\n0 0.5 0.5 0 0.2\n\n"
               "1.0 0.5 0.5 0.2 0.2\n0.5 0.5 0.5 0.2 0.2\n0 nan 0.5 0.2 0.2\n")  # fmt: skip
    (tmp_path / "classes.txt").write_text("p\nq\n")
    ds = YoloDataset(tmp_path, "all")  # a plain folder: images/ + labels/ + classes.txt
    counts = ds.skips.counts
    assert ds.num_objects == 2 and ds.classes == ("p", "q")
    assert ds.get_target(0)["labels"].tolist() == [0, 1]  # "1.0" is class 1
    assert counts["class index outside 0..1"] == 2
    assert counts["label lines without 5 columns (c cx cy w h)"] == 1
    assert counts["label lines with a non-number"] == 1
    assert counts["coordinates outside [0, 1]"] == 3
    assert counts["boxes of non-positive size"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 5 and any("a.txt:2: class 5" in w for w in warnings)


def test_classes_by_name_and_missing_split(tmp_path):
    a = _image(tmp_path / "images" / "a.jpg")
    _labels(a, "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n")
    (tmp_path / "classes.txt").write_text("p\nq\n")
    ds = YoloDataset(tmp_path, "all", classes=("q", "z"))
    assert ds.get_target(0)["labels"].tolist() == [0]
    assert ds.skips.counts["objects of classes not in the class list"] == 1
    with pytest.raises(BadDataset, match=r"no images/train folder: split it with python import"):
        YoloDataset(tmp_path, "train")
    (tmp_path / "data.yaml").write_text("train: images\nnames: [p, q]\n")
    with pytest.raises(BadDataset, match="no split 'val'"):
        YoloDataset(tmp_path / "data.yaml", "val")


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "not a YOLO dataset YAML"), ("train: x\n", "no 'names'"),
     ("names: {1: a}\n", "must be 0..N-1"), ("names: []\n", "non-empty")],
)  # fmt: skip
def test_not_a_dataset_yaml(tmp_path, text, message):
    (tmp_path / "data.yaml").write_text(text)
    with pytest.raises(BadDataset, match=message):
        YoloDataset(tmp_path / "data.yaml")


def test_folder_without_classes_says_what_to_write(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no classes\.txt"):
        YoloDataset(tmp_path, "all")


def test_random_labels_match_a_line_by_line_reference(tmp_path):
    rng = np.random.default_rng(1)
    lines, want = [], []
    for _ in range(50):
        cls, cx, cy, w, h = int(rng.integers(3)), *rng.uniform(0.01, 1.0, size=4).tolist()
        lines.append(f"{cls} {cx!r} {cy!r} {w!r} {h!r}")
        box = [max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(1.0, cx + w / 2),
               min(1.0, cy + h / 2)]  # fmt: skip
        want.append((cls, box))
    a = _image(tmp_path / "images" / "a.jpg")
    _labels(a, "\n".join(lines))
    (tmp_path / "classes.txt").write_text("p\nq\nr\n")
    target = YoloDataset(tmp_path, "all").get_target(0)
    assert target["labels"].tolist() == [cls for cls, _ in want]
    expected = np.array([box for _, box in want], np.float32)
    np.testing.assert_array_equal(target["boxes"].numpy(), expected)


def test_images_sharing_a_stem_keep_apart(tmp_path):
    _labels(_image(tmp_path / "images" / "val" / "x.jpg"), "0 0.5 0.5 0.2 0.2\n")
    _labels(_image(tmp_path / "images" / "val" / "sub" / "x.jpg"), "0 0.5 0.5 0.4 0.4\n")
    (tmp_path / "data.yaml").write_text("train: images/val\nval: images/val\nnames: [a]\n")
    dataset = YoloDataset(tmp_path / "data.yaml", "val")
    ids = sorted(dataset.get_target(i)["image_id"] for i in range(2))
    assert ids == ["images/val/sub/x.jpg", "images/val/x.jpg"]  # the evaluator keys by id


def test_strict_stops_at_a_class_not_in_the_list(tmp_path):
    _labels(_image(tmp_path / "images" / "train" / "a.jpg"), "1 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cat, dog]\n")
    from utils.formats import open_dataset

    assert len(open_dataset(tmp_path / "data.yaml", "train", classes=("cat",))) == 1
    with pytest.raises(ValueError, match=r"'dog': 1.*leave out --strict"):
        open_dataset(tmp_path / "data.yaml", "train", classes=("cat",), strict=True)
