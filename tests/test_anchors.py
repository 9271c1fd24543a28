"""Anchors: defaults, JSON files and box sizes from VOC XML."""

import json
import logging

import pytest
import torch

from utils.anchors import (
    DARKNET_VOC_ANCHORS_GRID,
    default_anchors,
    load_anchors,
    read_voc_box_sizes,
    save_anchors,
)
from utils.data import VOCDataset

# ---------------------------------------------------------------------------------------------
# defaults and JSON files


def test_default_anchors_are_darknets_voc_set_over_13():
    anchors = default_anchors()
    assert anchors.shape == (5, 2) and anchors.dtype == torch.float32
    torch.testing.assert_close(anchors * 13, torch.tensor(DARKNET_VOC_ANCHORS_GRID))
    assert bool(((anchors > 0) & (anchors <= 1)).all())


def test_save_then_load_round_trip(tmp_path):
    anchors = torch.rand(7, 2) * 0.9 + 0.05
    path = tmp_path / "sub" / "anchors.json"
    save_anchors(anchors, path)
    assert torch.equal(load_anchors(path), anchors)
    entries = json.loads(path.read_text())
    assert entries[0] == {"width": float(anchors[0, 0]), "height": float(anchors[0, 1])}
    assert [p.name for p in path.parent.iterdir()] == ["anchors.json"]  # no temp file left


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[{'width': 0.1}", "not valid JSON"),
        ('{"width": 0.1, "height": 0.2}', "expected a non-empty list"),
        ("[]", "expected a non-empty list"),
        ('[{"width": 0.1}]', "entry 0 .* exactly the keys"),
        ('[{"width": 0.1, "height": 0.2, "depth": 1}]', "exactly the keys"),
        ('[{"width": 0.1, "height": 0.2}, {"width": 1.3221, "height": 1.7}]', "entry 1: width"),
        ('[{"width": 0, "height": 0.2}]', r"not a fraction of the image in \(0, 1\]"),
        ('[{"width": 0.5, "height": -0.2}]', "height = -0.2"),
        ('[{"width": true, "height": 0.2}]', "width = True"),
        ('[{"width": "0.5", "height": 0.2}]', "width = '0.5'"),
    ],
)
def test_bad_anchor_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_anchors(path)
    assert str(path) in str(info.value)


def test_missing_anchor_file_and_bad_anchors_to_save(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none\.json does not exist"):
        load_anchors(tmp_path / "none.json")
    with pytest.raises(ValueError, match="shape"):
        save_anchors(torch.rand(5), tmp_path / "a.json")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        save_anchors(default_anchors() * 13, tmp_path / "a.json")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# box sizes from VOC XML


def test_read_voc_box_sizes_skips_difficult_and_degenerate(voc_writer, caplog):
    voc_writer.add(
        "a",
        [
            ("cat", (1, 1, 33, 25), 0),  # 32x24 of 64x48
            ("dog", (10, 10, 26, 46), 1),  # difficult
            ("cat", (5, 5, 5, 20), 0),  # zero width: dropped with a warning
        ],
    )
    voc_writer.add("b", [("dog", (1, 1, 80, 13), None)])  # wider than the image: clamped
    sets = voc_writer.write_set("trainval")
    with caplog.at_level(logging.WARNING):
        sizes = read_voc_box_sizes(voc_writer.root, sets, ["cat", "dog"])
    assert torch.equal(sizes, torch.tensor([[0.5, 0.5], [1.0, 0.25]]))
    assert "zero-area box" in caplog.text and "a.xml" in caplog.text
    with_difficult = read_voc_box_sizes(voc_writer.root, sets, ["cat", "dog"], keep_difficult=True)
    torch.testing.assert_close(with_difficult[1], torch.tensor([0.25, 0.75]))
    assert len(with_difficult) == 3


def test_read_voc_box_sizes_are_the_training_targets(voc_writer):
    # the image header's size wins over <size>, as in training; (w, h) = x2 - x1 of the
    # float32 normalised targets, bit for bit
    voc_writer.add("a", [("cat", (1, 1, 33, 25), 0)], xml_size=(48, 64))  # <size> is wrong
    voc_writer.add("b", [("dog", (-5, 20, 50, 99), 0), ("cat", (3, 4, 60, 40), 1)], xml_size=None)
    voc_writer.add("c", [("dog", (10, 2, 41, 47), 0)], size=(80, 60))
    sets = voc_writer.write_set("trainval")
    sizes = read_voc_box_sizes(voc_writer.root, sets, ["cat", "dog"])
    assert torch.equal(sizes[0], torch.tensor([0.5, 0.5]))
    for keep_difficult in (False, True):
        dataset = VOCDataset(voc_writer.root, sets, ["cat", "dog"], keep_difficult=keep_difficult)
        targets = [dataset.get_target(i)["boxes"] for i in range(len(dataset))]  # [G, 4] each
        expected = torch.cat([t[:, 2:] - t[:, :2] for t in targets])
        sizes = read_voc_box_sizes(
            voc_writer.root, sets, ["cat", "dog"], keep_difficult=keep_difficult
        )
        assert torch.equal(sizes, expected)
    assert len(sizes) == 4


def test_read_voc_box_sizes_skip_bad_files_and_unknown_classes(voc_writer, caplog):
    voc_writer.add("good", [("cat", (1, 1, 33, 25), 0), ("zebra", (1, 1, 10, 10), 0)])
    voc_writer.image("broken")
    voc_writer.raw_annotation("broken", "<annotation><object><name>cat</name>")
    voc_writer.add("nan", [("cat", (1, "x", 10, 10), 0)])
    voc_writer.annotation("noimage", [("cat", (1, 1, 10, 10), 0)])
    voc_writer.image("ghost")
    sets = voc_writer.write_set("trainval", ids=["good", "broken", "nan", "noimage", "ghost"])
    with caplog.at_level(logging.WARNING):
        sizes = read_voc_box_sizes(voc_writer.root, sets, ["cat"])
    assert torch.equal(sizes, torch.tensor([[0.5, 0.5]]))
    for name, reason in [
        ("good.xml", "unknown class 'zebra'"),
        ("broken.xml", "malformed XML"),
        ("nan.xml", "bad coordinates"),
        ("noimage.jpg", "missing image"),
        ("ghost.xml", "missing annotation"),
    ]:
        assert any(name in line and reason in line for line in caplog.messages), name
    assert "{'zebra': 1}" in caplog.text
    with pytest.raises(ValueError, match=r"class 'zebra', which is not in the class list"):
        read_voc_box_sizes(voc_writer.root, sets, ["cat"], strict=True)


def test_read_voc_box_sizes_errors(voc_writer):
    with pytest.raises(FileNotFoundError, match="check --data-root"):
        read_voc_box_sizes(voc_writer.root, [("test", "val")], ["zebra"])
    voc_writer.add("c", [])  # background only
    voc_writer.add("d", [("zebra", (1, 1, 10, 10), 0)])
    voc_writer.write_set("empty", ids=["c", "d"])
    with pytest.raises(ValueError, match="no boxes found"):
        read_voc_box_sizes(voc_writer.root, [("test", "empty")], ["cat"])
