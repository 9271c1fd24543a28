"""Anchors: darknet's defaults, anchor files (the grid-unit format and the legacy one), and box
sizes read from VOC XML."""

import dataclasses
import json
import logging

import pytest
import torch

from utils.anchors import (
    DARKNET_VOC_ANCHORS_GRID,
    anchors_for_size,
    anchors_img_size,
    default_anchors,
    load_anchors,
    read_voc_box_sizes,
    save_anchors,
)
from utils.data import VOCDataset

# darknet cfg/yolov2-voc.cfg, [region] anchors = 1.3221, 1.73145, 3.19275, 4.00944, ...
YOLOV2_VOC_CFG_ANCHORS = [
    [1.3221, 1.73145],
    [3.19275, 4.00944],
    [5.05587, 8.09892],
    [9.47112, 4.84053],
    [11.2364, 10.0071],
]

# ---------------------------------------------------------------------------------------------
# defaults and anchor files


def test_default_anchors_are_darknets_voc_cfg_numbers_in_grid_cells():
    anchors = default_anchors()
    assert anchors.shape == (5, 2) and anchors.dtype == torch.float32
    assert torch.equal(anchors, torch.tensor(YOLOV2_VOC_CFG_ANCHORS))
    assert [list(pair) for pair in DARKNET_VOC_ANCHORS_GRID] == YOLOV2_VOC_CFG_ANCHORS


def test_save_then_load_round_trip(tmp_path, caplog):
    anchors = torch.rand(7, 2, generator=torch.Generator().manual_seed(0)) * 12 + 0.2
    path = tmp_path / "sub" / "anchors.json"
    cfg = "anchors = 1,2, 3,4"
    with caplog.at_level(logging.WARNING):
        save_anchors(anchors, path, img_size=416, mean_iou=0.61, darknet_cfg=cfg)
        assert torch.equal(load_anchors(path), anchors)
    assert not caplog.records  # the new format loads silently
    document = json.loads(path.read_text())
    assert document == {
        "unit": "grid",
        "stride": 32,
        "anchors": anchors.tolist(),
        "img_size": 416,
        "mean_iou": 0.61,
        "darknet_cfg": cfg,
    }
    assert len(path.read_text().splitlines()) == 2 + len(document)  # a key per line
    assert [p.name for p in path.parent.iterdir()] == ["anchors.json"]  # no temp file left
    save_anchors(default_anchors(), path)  # overwrites, without extra keys
    assert torch.equal(load_anchors(path), default_anchors())
    assert set(json.loads(path.read_text())) == {"unit", "stride", "anchors"}


def test_seed_format_is_read_times_13_with_one_warning_that_gives_the_fix(tmp_path, caplog):
    fractions = [[0.1017, 0.1332], [0.2456, 0.3084], [0.8643, 0.7698]]
    path = tmp_path / "seed.json"
    path.write_text(json.dumps([{"width": w, "height": h} for w, h in fractions]))
    with caplog.at_level(logging.WARNING):
        anchors = load_anchors(path)
    assert torch.equal(anchors, (torch.tensor(fractions, dtype=torch.float64) * 13).float())
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in message
    assert str(path) in message and "x13" in message and "kmeans.py" in message
    rewritten = tmp_path / "rewritten.json"  # the content the warning proposes
    rewritten.write_text(message[message.index("{") :])
    caplog.clear()
    torch.testing.assert_close(load_anchors(rewritten), anchors, rtol=1e-5, atol=0)
    assert not caplog.records
    assert path.read_text().startswith("[")  # the user's file is left as it was


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"unit": "grid", "stride": 32, "anchors": [[1, 2]', "not valid JSON"),
        ("3.5", "holds float 3.5"),
        ("[]", r"holds list \[\]"),
        ("[[1.3, 1.7], [3.2, 4.0]]", "holds list"),
        ('{"anchors": [[1.3, 1.7]]}', r"lacks the keys \['stride', 'unit'\]"),
        ('{"unit": "pixels", "stride": 32, "anchors": [[40, 55]]}', "unit 'pixels' is not known"),
        ('{"unit": "grid", "stride": 16, "anchors": [[1.3, 1.7]]}', "stride 16"),
        ('{"unit": "grid", "stride": 32, "anchors": []}', "'anchors' is \\[\\], expected"),
        ('{"unit": "grid", "stride": 32, "anchors": {"w": 1}}', "expected a non-empty list"),
        ('{"unit": "grid", "stride": 32, "anchors": [[1.3, 1.7, 2]]}', "anchor 0 is"),
        ('{"unit": "grid", "stride": 32, "anchors": [[1.3, 1.7], [0, 2]]}', "anchor 1 is"),
        ('{"unit": "grid", "stride": 32, "anchors": [[1.3, -1.7]]}', "anchor 0 is"),
        ('{"unit": "grid", "stride": 32, "anchors": [[NaN, 1.7]]}', r"anchor 0 is \[nan"),
        ('{"unit": "grid", "stride": 32, "anchors": [[Infinity, 1.7]]}', "anchor 0 is"),
        ('{"unit": "grid", "stride": 32, "anchors": [[true, 1.7]]}', "anchor 0 is"),
        ('{"unit": "grid", "stride": 32, "anchors": [["1.3", 1.7]]}', "anchor 0 is"),
        ('[{"width": 0.1}]', "entry 0 .* exactly the keys 'width' and 'height'"),
        ('[{"width": 0.1, "height": 0.2, "depth": 1}]', "exactly the keys"),
        ('[{"width": 0.1, "height": 0.2}, {"width": 1.3221, "height": 1.7}]', "entry 1: width"),
        ('[{"width": 0, "height": 0.2}]', r"not a fraction of the image in \(0, 1\]"),
        ('[{"width": 0.5, "height": NaN}]', "height = nan"),
        ('[{"width": true, "height": 0.2}]', "width = True"),
    ],
)
def test_bad_anchor_files_give_one_line_naming_the_file_and_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_anchors(path)
    error = str(info.value)
    assert error.startswith(f"anchor file {path}") and "\n" not in error
    fixes = ('{"unit": "grid", "stride": 32, "anchors": [[w, h], ...]}', "unit is 'grid'")
    fixes += ("stride 32", "[w, h]")
    assert any(fix in error for fix in fixes)
    assert path.read_text() == text


def test_missing_anchor_file_and_bad_anchors_to_save(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none\.json does not exist: give a JSON file"):
        load_anchors(tmp_path / "none.json")
    for anchors, message in [
        (torch.rand(5), "shape"),
        (torch.zeros(0, 2), "shape"),
        (torch.tensor([[1.0, 0.0]]), "finite and positive"),
        (torch.tensor([[1.0, float("nan")]]), "finite and positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            save_anchors(anchors, tmp_path / "a.json")
    with pytest.raises(ValueError, match=r"keys \['unit'\] itself"):
        save_anchors(default_anchors(), tmp_path / "a.json", unit="pixels")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# box sizes from VOC XML


def test_read_voc_box_sizes_skips_difficult_and_degenerate(voc_writer, caplog):
    voc_writer.add(
        "a",
        [
            ("cat", (1, 1, 32, 24), 0),  # pixels 1..32 x 1..24 of 64x48, corners inclusive
            ("dog", (10, 10, 25, 45), 1),  # difficult
            ("cat", (6, 5, 5, 20), 0),  # inverted: dropped with a warning
            ("cat", (5, 5, 5, 28), 0),  # one pixel wide: a valid object, as for the devkit
        ],
    )
    voc_writer.add("b", [("dog", (1, 1, 80, 12), None)])  # wider than the image: clamped
    sets = voc_writer.write_set("trainval")
    with caplog.at_level(logging.WARNING):
        sizes = read_voc_box_sizes(voc_writer.root, sets, ["cat", "dog"])
    expected = torch.tensor([[32 / 64, 24 / 48], [1 / 64, 24 / 48], [1.0, 12 / 48]])
    torch.testing.assert_close(sizes, expected, rtol=1e-6, atol=0)  # float32 x2 - x1
    assert "inverted box" in caplog.text and "a.xml" in caplog.text
    with_difficult = read_voc_box_sizes(voc_writer.root, sets, ["cat", "dog"], keep_difficult=True)
    torch.testing.assert_close(with_difficult[1], torch.tensor([16 / 64, 36 / 48]))
    assert len(with_difficult) == 4


def test_read_voc_box_sizes_are_the_training_targets(voc_writer):
    # the image header's size wins over <size>, as in training; (w, h) = x2 - x1 of the
    # float32 normalised targets, bit for bit
    voc_writer.add("a", [("cat", (1, 1, 32, 24), 0)], xml_size=(48, 64))  # <size> is wrong
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
    voc_writer.add("good", [("cat", (1, 1, 32, 24), 0), ("zebra", (1, 1, 10, 10), 0)])
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


# ---------------------------------------------------------------------------------------------
# anchors fitted at one input size, trained at another


def test_anchors_img_size_is_what_kmeans_recorded(tmp_path):
    path = tmp_path / "a.json"
    save_anchors(torch.tensor([[2.0, 3.0]]), path, img_size=416)
    assert anchors_img_size(path) == 416
    save_anchors(torch.tensor([[2.0, 3.0]]), path)
    assert anchors_img_size(path) is None  # darknet's numbers or a hand-written file
    save_anchors(torch.tensor([[2.0, 3.0]]), path, img_size="416")
    assert anchors_img_size(path) is None


def test_anchors_for_size_keeps_the_share_of_the_image_or_the_cells():
    fitted = torch.tensor([[2.21, 2.03], [6.42, 4.40]])  # cells of 13 (416)
    scaled, line = anchors_for_size(fitted, 416, 256, scale=True)
    # the same share of the image: cells / grid size is unchanged (8 cells at 256)
    torch.testing.assert_close(scaled / 8, fitted / 13)
    assert "x8/13" in line and "416" in line and "256" in line
    kept, line = anchors_for_size(fitted, 416, 256, scale=False)
    assert torch.equal(kept, fitted) and "1.62x the boxes" in line


def test_a_run_at_another_size_says_so_once_and_scales_on_request(tmp_path, caplog):
    from yolo.config import TrainConfig
    from yolo.train import run_anchors

    path = tmp_path / "anchors-5.json"
    save_anchors(torch.tensor([[2.6, 3.9], [6.5, 5.2]]), path, img_size=416)
    config = TrainConfig(anchors=str(path), img_size=256, eval_img_size=256, data="data/x")
    with caplog.at_level(logging.WARNING):
        anchors = run_anchors(dataclasses.replace(config, scale_anchors=True), say=True)
    torch.testing.assert_close(anchors, torch.tensor([[1.6, 2.4], [4.0, 3.2]]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "--img-size 416" in warnings[0] and "256" in warnings[0]
    assert "python kmeans.py --data data/x --img-size 256" in warnings[0]
    caplog.clear()
    raw = run_anchors(config, say=True)  # the default: darknet's cells, as they are
    assert torch.equal(raw, load_anchors(path)) and "1.62x" in caplog.text
    assert "--scale-anchors scales them x8/13" in caplog.text
    assert "python kmeans.py --data data/x --img-size 256" in caplog.text
    caplog.clear()
    same = run_anchors(dataclasses.replace(config, img_size=416, eval_img_size=416), say=True)
    assert torch.equal(same, load_anchors(path)) and not caplog.text  # fitted at this size
