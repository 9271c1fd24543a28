"""The importer on COCO JSON and YOLO-txt sources, formats it cannot read, and a real labelled
set exported to COCO and YOLO-txt with the same targets."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.data import CocoDataset, VOCDataset, YoloDataset
from utils.demo import DEMO_CLASSES
from utils.export_dataset import export_coco, export_yolo
from utils.importer import import_labelled
from utils.voc import load_classes

# the public raccoon set (github.com/datitran/raccoon_dataset) cloned as docs/own-data.md says
REPO = Path(__file__).resolve().parents[1]
RACCOON = Path(os.environ.get("YOLO_RACCOON_DIR", REPO / "data" / "raccoon_dataset"))


def _digests(folder: Path) -> dict:
    return {p: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def exports(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    export_coco(demo_root, [("demo", "train")], DEMO_CLASSES, out / "coco")
    export_yolo(demo_root, [("demo", "train")], DEMO_CLASSES, out / "yolo")
    return out


def _boxes_by_id(dataset) -> dict:
    return {dataset.get_target(i)["image_id"]: dataset.get_target(i) for i in range(len(dataset))}


def _assert_same_as_demo(demo_root, out: Path) -> None:
    imported = VOCDataset(out, [(out.name, "trainval")], load_classes(out / "classes.txt"))
    original = _boxes_by_id(VOCDataset(demo_root, [("demo", "train")], DEMO_CLASSES))
    got = _boxes_by_id(imported)
    assert got.keys() == original.keys()
    names = imported.classes
    for image_id, target in got.items():
        want = original[image_id]
        np.testing.assert_allclose(target["boxes"], want["boxes"], rtol=0, atol=1e-6)
        assert [names[i] for i in target["labels"]] == [DEMO_CLASSES[i] for i in want["labels"]]


def test_import_a_coco_json(demo_root, exports, tmp_path):
    coco = exports / "coco"
    before = _digests(coco)
    result = import_labelled(coco / "train", coco / "annotations" / "instances_train.json",
                             tmp_path / "fromcoco", val=0.25)  # fmt: skip
    assert len(result.splits["train"]) == 18 and len(result.splits["val"]) == 6
    _assert_same_as_demo(demo_root, tmp_path / "fromcoco")
    assert _digests(coco) == before


def test_import_yolo_txt_asks_for_the_names_then_imports(demo_root, exports, tmp_path):
    yolo = tmp_path / "yolo"
    shutil.copytree(exports / "yolo", yolo)
    labels = yolo / "labels" / "train"
    with pytest.raises(FileNotFoundError, match=r"found \.txt label files .*: YOLO-txt; .*write"):
        import_labelled(yolo / "images" / "train", labels, tmp_path / "fromyolo")
    (labels / "classes.txt").write_text("\n".join(DEMO_CLASSES) + "\n")
    before = _digests(yolo)
    import_labelled(yolo / "images" / "train", labels, tmp_path / "fromyolo")
    _assert_same_as_demo(demo_root, tmp_path / "fromyolo")
    assert _digests(yolo) == before


def test_formats_it_cannot_read_are_named(tmp_path):
    images, notes = tmp_path / "images", tmp_path / "notes"
    images.mkdir()
    notes.mkdir()
    (notes / "boxes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"found 1 \.csv"):
        import_labelled(images, notes, tmp_path / "out")
    (notes / "instances.json").write_text("{}")
    with pytest.raises(ValueError, match=r"COCO\? pass the file itself: --annotations .*\.json"):
        import_labelled(images, notes, tmp_path / "out")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        import_labelled(images, notes / "instances.json", tmp_path / "out")
    with pytest.raises(ValueError, match=r"is a \.csv file"):
        import_labelled(images, notes / "boxes.csv", tmp_path / "out")


@pytest.mark.skipif(not RACCOON.is_dir(), reason="the raccoon set is not here: clone "
                    "github.com/datitran/raccoon_dataset into data/raccoon_dataset, or set "
                    "YOLO_RACCOON_DIR to a folder with images/ and annotations/")  # fmt: skip
def test_a_real_labelled_set_exports_to_the_same_targets(tmp_path):
    out = tmp_path / "raccoon"
    import_labelled(RACCOON / "images", RACCOON / "annotations", out, link=True)
    classes = load_classes(out / "classes.txt")
    sets = [("raccoon", "train"), ("raccoon", "val")]
    export_coco(out, sets, classes, tmp_path / "coco", link=True)
    yaml = export_yolo(out, sets, classes, tmp_path / "yolo", link=True)
    for name, split in sets:
        voc = VOCDataset(out, [(name, split)], classes, keep_difficult=True)
        coco = CocoDataset(tmp_path / "coco" / "annotations" / f"instances_{split}.json")
        yolo = YoloDataset(yaml, split)
        assert len(voc) == len(coco) == len(yolo) > 0
        for index in range(len(voc)):
            want = voc.get_target(index)
            for other in (coco.get_target(index), yolo.get_target(index)):
                assert torch.equal(other["boxes"], want["boxes"])
                assert torch.equal(other["labels"], want["labels"])
                assert other["orig_size"] == want["orig_size"]
