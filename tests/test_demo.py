"""utils.demo: layout, determinism, idempotence, content, CLI."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from tests.conftest import VocWriter
from utils.data import VOCDataset
from utils.demo import (
    DEMO_CLASSES,
    _annotation_xml,
    _render,
    _shape_mask,
    generate_demo_dataset,
    main,
)
from utils.voc import load_classes

SMALL = {"num_train": 6, "num_val": 3, "seed": 4}


def _digests(root):
    return {
        str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_layout_and_sets(tmp_path):
    root = generate_demo_dataset(tmp_path, **SMALL)
    folder = root / "VOCdemo"
    assert len(list((folder / "JPEGImages").glob("*.jpg"))) == 9
    assert len(list((folder / "Annotations").glob("*.xml"))) == 9
    splits = {
        split: (folder / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        for split in ("train", "val", "trainval")
    }
    assert len(splits["train"]) == 6 and len(splits["val"]) == 3
    assert splits["trainval"] == splits["train"] + splits["val"]
    assert load_classes(root / "demo_classes.txt") == DEMO_CLASSES
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 4 and manifest["classes"] == list(DEMO_CLASSES)


def test_deterministic_from_the_seed(tmp_path):
    first = generate_demo_dataset(tmp_path / "a", **SMALL)
    second = generate_demo_dataset(tmp_path / "b", **SMALL)
    assert _digests(first) == _digests(second)
    other = generate_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 5})
    assert _digests(other) != _digests(first)


def test_idempotent_and_regenerates_on_new_parameters(tmp_path):
    root = generate_demo_dataset(tmp_path, **SMALL)
    image = root / "VOCdemo" / "JPEGImages" / "000000.jpg"
    stamp = image.stat().st_mtime_ns
    generate_demo_dataset(tmp_path, **SMALL)
    assert image.stat().st_mtime_ns == stamp
    generate_demo_dataset(tmp_path, **{**SMALL, "num_val": 4})
    assert len(list((root / "VOCdemo" / "JPEGImages").glob("*.jpg"))) == 10
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "VOCdemo").mkdir()
    (tmp_path / "VOCdemo" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="manifest"):
        generate_demo_dataset(tmp_path, **SMALL)
    assert (tmp_path / "VOCdemo" / "mine.txt").read_text() == "keep me"


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_demo_dataset(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="min_size"):
        generate_demo_dataset(tmp_path, min_size=300, max_size=200)


@pytest.mark.parametrize("label", range(len(DEMO_CLASSES)))
@pytest.mark.parametrize(("width", "height"), [(23, 17), (6, 40), (64, 64)])
def test_every_shape_touches_the_four_sides_of_its_box(label, width, height):
    ys, xs = np.nonzero(np.asarray(_shape_mask(label, width, height)))  # painted pixels
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (0, width, 0, height)


def test_xml_boxes_load_back_as_the_pixels_of_their_shapes(tmp_path):
    writer = VocWriter(tmp_path)
    expected = {}
    for index in range(6):
        rng = np.random.default_rng([7, index])
        canvas, objects = _render(rng, 120 + index, 90)
        canvas.save(writer.folder / "JPEGImages" / f"{index:06d}.jpg")
        writer.raw_annotation(
            f"{index:06d}", _annotation_xml(f"{index:06d}", 120 + index, 90, objects)
        )
        size = np.array([120 + index, 90, 120 + index, 90], dtype=np.float64)
        expected[f"{index:06d}"] = [np.array(obj["box"]) / size for obj in objects]
    ds = VOCDataset(tmp_path, writer.write_set(), DEMO_CLASSES)
    assert not ds.skipped and not ds.num_clamped
    for index in range(len(ds)):
        target = ds.get_target(index)
        boxes = np.array(expected[target["image_id"]], dtype=np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(target["boxes"].numpy(), boxes)  # [x0, x1) -> x0/W, x1/W
    assert sum(len(boxes) for boxes in expected.values()) > 6


def test_content_is_varied_and_loads_cleanly(demo_root):
    ds = VOCDataset(demo_root, [("demo", "trainval")], load_classes(demo_root / "demo_classes.txt"))
    assert len(ds) == 32 and not ds.skipped and not ds.num_clamped
    targets = [ds.get_target(index) for index in range(len(ds))]
    counts = [len(target["labels"]) for target in targets]
    assert max(counts) <= 6 and 0 in counts and sum(counts) > 2 * len(ds)
    labels = torch.cat([target["labels"] for target in targets])
    assert set(labels.tolist()) == set(range(len(DEMO_CLASSES)))
    boxes = torch.cat([target["boxes"] for target in targets])
    sides = boxes[:, 2:] - boxes[:, :2]  # [B, 2] normalised (w, h)
    assert sides.max() > 0.3 and sides.min() < 0.1  # small to large
    aspect = sides[:, 0] / sides[:, 1]
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    assert torch.cat([target["difficult"] for target in targets]).any()
    sizes = {target["orig_size"] for target in targets}
    assert len(sizes) > 20 and all(160 <= side <= 320 for size in sizes for side in size)


def test_cli(tmp_path, caplog):
    main(["--root", str(tmp_path), "--num-train", "2", "--num-val", "1", "--seed", "3"])
    assert (tmp_path / "VOCdemo" / "ImageSets" / "Main" / "val.txt").read_text() == "000002\n"
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path), "--num-trai", "2"])
