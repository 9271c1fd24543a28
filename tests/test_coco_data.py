"""CocoDataset: the bbox frame, category mapping, crowds, negatives, bad input, and the same
targets as VOC for the exported demo set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from utils.coco import BadDataset
from utils.data import CocoDataset, VOCDataset, YoloDataset
from utils.demo import DEMO_CLASSES
from utils.export_dataset import export_coco, export_yolo, main
from utils.transforms import build_train_transform


def _write_coco(tmp_path, images, annotations, categories, name="instances_train.json"):
    folder = tmp_path / "train"
    folder.mkdir(exist_ok=True)
    for image in images:
        if image.get("file", True):
            Image.new("RGB", (image["width"], image["height"])).save(folder / image["file_name"])
    path = tmp_path / "annotations" / name
    path.parent.mkdir(exist_ok=True)
    document = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(document))
    return path


def _image(image_id, width=100, height=50, **extra):
    return {"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height,
            **extra}  # fmt: skip


def _ann(ann_id, image_id, category_id, bbox, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3] * 0.5, "iscrowd": 0, **extra}  # fmt: skip


CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def test_frame_categories_crowds_negatives(tmp_path):
    path = _write_coco(
        tmp_path,
        [_image(7), _image(9, 40, 80)],
        [_ann(1, 7, 90, [10, 5, 20, 10]), _ann(2, 7, 3, [0, 0, 100, 50], iscrowd=1)],
        CATS,
    )
    ds = CocoDataset(path)  # image folder found by COCO's layout: ROOT/train
    assert ds.classes == ("person", "car", "toothbrush")
    assert ds.category_ids.tolist() == [1, 3, 90]
    image, target = ds[0]
    assert image.mode == "RGB" and image.size == (100, 50)
    assert torch.equal(target["boxes"], torch.tensor([[0.1, 0.1, 0.3, 0.3]]))
    assert target["labels"].tolist() == [2] and target["image_id"] == 7
    assert target["orig_size"] == (50, 100) and target["difficult"].tolist() == [False]
    assert target["areas"].tolist() == [100.0]  # the JSON's area, not w * h
    assert torch.equal(target["crowd_boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert target["crowd_labels"].tolist() == [1]
    negative = ds.get_target(1)
    assert negative["boxes"].shape == (0, 4) and negative["crowd_boxes"].shape == (0, 4)


def test_classes_by_name(tmp_path):
    path = _write_coco(tmp_path, [_image(1)], [_ann(1, 1, 1, [1, 1, 5, 5]),
                       _ann(2, 1, 90, [1, 1, 5, 5])], CATS)  # fmt: skip
    ds = CocoDataset(path, tmp_path / "train", classes=("dog", "person"))
    assert ds.get_target(0)["labels"].tolist() == [1]
    assert ds.category_ids.tolist() == [-1, 1]
    assert ds.skips.counts["annotations of an unknown or unlisted category_id"] == 1


def test_bad_input_is_counted(tmp_path, caplog):
    images = [_image(1), _image(1), _image(2, file=False), _image(3, file_name="../x.jpg")]
    annotations = [
        _ann(1, 1, 1, [10, 10, 10, 10]),
        _ann(1, 1, 1, [20, 20, 10, 10]),  # repeated id
        _ann(2, 1, 77, [10, 10, 10, 10]),  # unknown category
        _ann(3, 5, 1, [10, 10, 10, 10]),  # no such image
        _ann(4, 2, 1, [10, 10, 10, 10]),  # image without a file
        _ann(5, 1, 1, [200, 10, 10, 10]),  # fully outside
        _ann(6, 1, 1, [95, 10, 10, 10]),  # partly outside: clamped
        _ann(7, 1, 1, [10, 10, 0, 10]),  # empty
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 2]},
    ]
    path = _write_coco(tmp_path, images, annotations, CATS)
    ds = CocoDataset(path)
    counts = ds.skips.counts
    assert len(ds) == 1 and ds.num_objects == 2
    assert counts["repeated image ids (first kept)"] == 1
    assert counts["repeated annotation ids (first kept)"] == 1
    assert counts["annotations of an unknown or unlisted category_id"] == 1
    assert counts["annotations of an image_id with no usable image"] == 2
    assert counts["images without a file"] == 1
    assert counts["file_name outside the image folder"] == 1
    assert counts["boxes fully outside their image, dropped"] == 1
    assert counts["boxes partly outside their image, clamped"] == 1
    assert counts["boxes with a non-positive or non-finite size, dropped"] == 1
    assert counts["annotations without image_id, category_id or a 4-number bbox"] == 1
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == len(counts)
    assert ds.get_target(0)["boxes"][1].tolist() == pytest.approx([0.95, 0.2, 1.0, 0.4])
    kept = CocoDataset(path, keep_unreadable=True)  # evaluation keeps the image without file
    assert len(kept) == 2 and kept[1][1]["unreadable"] and kept[1][0].size == (100, 50)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "is not valid JSON"), ('{"images": []}', "not a COCO instances file"),
     ("[1, 2]", "not a COCO instances file")],
)  # fmt: skip
def test_not_a_dataset(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(BadDataset, match=message):
        CocoDataset(path, tmp_path)


def _reference_target(document, image_id, classes_by_id):
    """Obviously correct: one annotation at a time, in the JSON's order."""
    image = next(i for i in document["images"] if i["id"] == image_id)
    width, height = image["width"], image["height"]
    boxes, labels = [], []
    for ann in document["annotations"]:
        if ann["image_id"] != image_id or ann["iscrowd"]:
            continue
        x, y, w, h = ann["bbox"]
        box = [max(0, x) / width, max(0, y) / height, min(width, x + w) / width,
               min(height, y + h) / height]  # fmt: skip
        if box[2] <= box[0] or box[3] <= box[1]:
            continue  # fully outside the image
        boxes.append(box)
        labels.append(classes_by_id[ann["category_id"]])
    return np.array(boxes, np.float32).reshape(-1, 4), labels


def test_random_json_matches_a_per_annotation_reference(tmp_path):
    rng = np.random.default_rng(0)
    images = [_image(i, int(rng.integers(20, 90)), int(rng.integers(20, 90))) for i in range(12)]
    annotations = []
    for ann_id in range(80):
        image = images[int(rng.integers(len(images)))]
        x, y = rng.uniform(-5, image["width"] - 3), rng.uniform(-5, image["height"] - 3)
        bbox = [x, y, rng.uniform(1, 30), rng.uniform(1, 30)]
        cat = CATS[int(rng.integers(3))]["id"]
        annotations.append(_ann(ann_id, image["id"], cat, bbox, iscrowd=int(rng.random() < 0.1)))
    path = _write_coco(tmp_path, images, annotations, CATS)
    ds = CocoDataset(path)
    document = json.loads(path.read_text())
    by_id = {1: 0, 3: 1, 90: 2}
    for index in range(len(ds)):
        target = ds.get_target(index)
        boxes, labels = _reference_target(document, target["image_id"], by_id)
        np.testing.assert_allclose(target["boxes"].numpy(), boxes, rtol=0, atol=1e-7)
        assert target["labels"].tolist() == labels


@pytest.fixture(scope="module")
def exported(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    sets = [("demo", "train"), ("demo", "val")]
    export_coco(demo_root, sets, DEMO_CLASSES, out / "coco")
    yaml = export_yolo(demo_root, sets, DEMO_CLASSES, out / "yolo")
    return out / "coco", yaml


@pytest.mark.parametrize("split", ["train", "val"])
def test_exported_demo_gives_the_voc_targets(demo_root, exported, split):
    coco_root, yaml = exported
    transform = build_train_transform(96, jitter=0.2, hue=0.1, saturation=1.5, exposure=1.5)
    voc = VOCDataset(demo_root, [("demo", split)], DEMO_CLASSES, transform=transform)
    coco = CocoDataset(coco_root / "annotations" / f"instances_{split}.json", transform=transform)
    yolo = YoloDataset(yaml, split, transform=transform)
    assert len(voc) == len(coco) == len(yolo) and coco.classes == yolo.classes == DEMO_CLASSES
    for index in range(len(voc)):
        want = voc.get_target(index)
        for other in (coco, yolo):
            got = other.get_target(index)
            assert torch.equal(got["boxes"], want["boxes"])
            assert torch.equal(got["labels"], want["labels"])
            assert got["orig_size"] == want["orig_size"]
        assert yolo.get_target(index)["image_id"] == want["image_id"]
    for index in (0, len(voc) - 1):  # the same augmentation under the same item seed
        image, target = voc[(index, 123)]
        for other in (coco, yolo):
            other_image, other_target = other[(index, 123)]
            assert torch.equal(other_image, image)
            assert torch.equal(other_target["boxes"], target["boxes"])


def test_export_cli_refuses_a_non_empty_folder(demo_root, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    argv = ["--to", "coco", "--data-root", str(demo_root), "--sets", "demo:val", "--out"]
    assert main([*argv, str(tmp_path)]) == 2
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert main([*argv, str(tmp_path / "new"), "--classes", str(demo_root / "nope.txt")]) == 2


def test_no_usable_image_is_one_error(tmp_path):
    path = _write_coco(tmp_path, [_image(1, file=False)], [], CATS)
    with pytest.raises(ValueError, match=r"no usable image in .*: images without a file: 1"):
        CocoDataset(path)


def test_an_image_that_does_not_decode_is_replaced_by_the_next(tmp_path):
    path = _write_coco(tmp_path, [_image(1), _image(2, 30, 20)], [_ann(1, 2, 1, [1, 1, 5, 5])],
                       CATS)  # fmt: skip
    (tmp_path / "train" / "1.jpg").write_bytes(b"not a jpeg")
    image, target = CocoDataset(path)[0]
    assert image.size == (30, 20) and target["image_id"] == 2
    kept = CocoDataset(path, keep_unreadable=True)
    image, target = kept[0]
    assert image.size == (100, 50) and target["unreadable"] and kept.unreadable == [1]


def test_a_coco_folder_picks_instances_files_of_each_split(tmp_path):
    from utils.formats import open_dataset

    categories = [{"id": 1, "name": "person"}]
    for name in ("instances_train2017.json", "instances_val2017.json",
                 "captions_train2017.json", "person_keypoints_val2017.json",
                 "instances_trainval.json"):  # fmt: skip
        _write_coco(tmp_path, [_image(1)], [_ann(1, 1, 1, [1, 1, 5, 5])], categories, name)
    (tmp_path / "val2017").symlink_to(tmp_path / "train")
    (tmp_path / "train2017").symlink_to(tmp_path / "train")
    (tmp_path / "trainval").symlink_to(tmp_path / "train")
    train, val = (open_dataset(tmp_path, split) for split in ("train", "val"))
    assert train.annotation_file.name == "instances_train2017.json"
    assert val.annotation_file.name == "instances_val2017.json"
    given = tmp_path / "annotations" / "instances_train2017.json"
    assert open_dataset(given, "val").annotation_file.name == "instances_val2017.json"
    trainval = tmp_path / "annotations" / "instances_trainval.json"
    assert open_dataset(trainval, "val").annotation_file == trainval  # no "valval" twin


def test_strict_stops_at_a_category_not_in_the_list(tmp_path):
    from utils.formats import open_dataset

    path = _write_coco(tmp_path, [_image(1)], [_ann(1, 1, 3, [1, 1, 5, 5])], CATS)
    assert len(open_dataset(path, "train", classes=("person",))) == 1
    with pytest.raises(ValueError, match=r"'car': 1.*leave out --strict"):
        open_dataset(path, "train", classes=("person",), strict=True)
