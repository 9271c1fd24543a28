"""utils.data: the VOC dataset, its box frame, image lookup, bad input, unreadable images, seeds."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import VocWriter
from utils.data import VOC_CLASSES, VOCDataset
from utils.demo import DEMO_CLASSES
from utils.loader import build_dataloader, collate_detection
from utils.transforms import build_eval_transform, build_train_transform
from utils.voc import parse_sets

CLASSES = ("cat", "dog")


def _dataset(writer: VocWriter, **kwargs) -> VOCDataset:
    kwargs.setdefault("classes", CLASSES)
    return VOCDataset(writer.root, writer.write_set(), **kwargs)


# ------------------------------------------------------------------------------------ classes


def test_voc_classes_standard_order():
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person"
    assert VOC_CLASSES[-1] == "tvmonitor"


# ------------------------------------------------------------------------------------ the dataset


def test_demo_items(demo_root):
    ds = VOCDataset(demo_root, [("demo", "train")], DEMO_CLASSES)
    assert len(ds) == 24 and not ds.skipped
    for index in range(len(ds)):
        image, target = ds[index]
        assert image.mode == "RGB"
        assert target["orig_size"] == (image.height, image.width)
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(target["labels"]), 4)
        assert target["labels"].dtype == torch.int64 and target["difficult"].dtype == torch.bool
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert target["image_id"] == f"{index:06d}"
    assert "24 images" in ds.summary()


def test_boxes_follow_the_voc_pixel_frame(voc_writer):
    voc_writer.add("a", [("dog", (11, 21, 31, 41), 0), ("cat", (1, 1, 100, 50), 0)], size=(100, 50))
    ds = _dataset(voc_writer)
    _, target = ds[0]
    expected = torch.tensor([[10 / 100, 20 / 50, 31 / 100, 41 / 50], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [1, 0] and target["difficult"].tolist() == [False] * 2
    assert target["unreadable"] is False and not ds.num_clamped  # the whole image: no clamping


@pytest.mark.parametrize("corners", [(10, 10, 10, 30), (10, 10, 30, 10), (64, 48, 64, 48)])
def test_one_pixel_wide_objects_are_kept(voc_writer, corners):
    voc_writer.add("a", [("cat", corners, 0)], size=(64, 48))
    ds = _dataset(voc_writer)
    xmin, ymin, xmax, ymax = corners
    expected = torch.tensor([[(xmin - 1) / 64, (ymin - 1) / 48, xmax / 64, ymax / 48]])
    torch.testing.assert_close(ds[0][1]["boxes"], expected)
    assert not ds.skipped


def test_keep_difficult_flag(voc_writer):
    voc_writer.add("a", [("cat", (2, 2, 20, 20), 1), ("dog", (5, 5, 30, 30), 0)])
    kept = _dataset(voc_writer)[0][1]
    assert kept["labels"].tolist() == [0, 1] and kept["difficult"].tolist() == [True, False]
    dropped = _dataset(voc_writer, keep_difficult=False)[0][1]
    assert dropped["labels"].tolist() == [1] and dropped["difficult"].tolist() == [False]


def test_sets_concatenate(demo_root):
    ds = VOCDataset(demo_root, parse_sets(["demo:train", "demo:val"]), DEMO_CLASSES)
    assert len(ds) == 32
    assert ds.get_target(24)["image_id"] == "000024"


def test_missing_set_file_says_how_to_get_voc_or_which_sets_there_are(tmp_path, demo_root):
    with pytest.raises(FileNotFoundError, match=r"VOC2007.*download_voc\.py.*import_voc\.py"):
        VOCDataset(tmp_path, [("2007", "trainval")])
    sets = r"holds the sets demo:train, demo:trainval, demo:val: name them with --train-sets"
    sets += " and --val-set and give --data " + re.escape(str(demo_root))
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/nosuch\.txt.*" + sets):
        VOCDataset(demo_root, [("demo", "nosuch")], DEMO_CLASSES)


def test_nothing_usable_is_an_error(voc_writer):
    voc_writer.raw_annotation("a", "<annotation>")
    with pytest.raises(ValueError, match="no usable image"):
        _dataset(voc_writer)


# -------------------------------------------------------------------------------------- bad input


def _good(writer: VocWriter) -> None:
    writer.add("good", [("cat", (3, 3, 30, 30), 0)])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<annotation><object><name>cat</name>", "malformed XML"),  # truncated
        ("not xml at all", "malformed XML"),
        (
            "<annotation><object><name>cat</name><bndbox><xmin>a</xmin><ymin>1</ymin>"
            "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>",
            "bad coordinates",
        ),
        (
            "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>5</xmax></bndbox></object></annotation>",
            "bad coordinates",
        ),
        ("<annotation><object><bndbox/></object></annotation>", "malformed XML"),
    ],
)
def test_bad_xml_skips_the_file_and_reports_it(voc_writer, caplog, text, reason):
    _good(voc_writer)
    voc_writer.image("bad")
    xml = voc_writer.raw_annotation("bad", text)
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        ds = _dataset(voc_writer)
    assert len(ds) == 1 and ds.get_target(0)["image_id"] == "good"
    assert [path for path, _ in ds.skipped] == [str(xml)]
    assert ds.skipped[0][1].startswith(reason)
    assert str(xml) in caplog.text
    assert reason in ds.summary()


def test_external_entities_are_never_resolved(voc_writer, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("dog")
    _good(voc_writer)
    voc_writer.image("evil")
    voc_writer.raw_annotation(
        "evil",
        f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file://{secret}">]>'
        "<annotation><object><name>&e;</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>",
    )
    ds = _dataset(voc_writer)
    assert len(ds) == 1 and "malformed XML" in ds.skipped[0][1]
    assert "dog" not in ds.skipped[0][1]


def test_missing_size_uses_the_image(voc_writer):
    voc_writer.add("a", [("cat", (11, 11, 31, 21), 0)], size=(80, 40), xml_size=None)
    _, target = _dataset(voc_writer)[0]
    assert target["orig_size"] == (40, 80)
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[10 / 80, 10 / 40, 31 / 80, 21 / 40]])
    )


def test_wrong_size_in_xml_loses_to_the_image(voc_writer):
    voc_writer.add("a", [("cat", (11, 11, 31, 21), 0)], size=(80, 40), xml_size=(800, 400))
    assert _dataset(voc_writer)[0][1]["orig_size"] == (40, 80)


def test_partly_outside_boxes_are_clamped(voc_writer):
    voc_writer.add("a", [("cat", (-9, 11, 200, 61), 0)], size=(64, 48))
    ds = _dataset(voc_writer)
    torch.testing.assert_close(ds[0][1]["boxes"], torch.tensor([[0.0, 10 / 48, 1.0, 1.0]]))
    assert ds.num_clamped == 1 and not ds.skipped and "1 boxes clamped" in ds.summary()


@pytest.mark.parametrize(
    ("corners", "why"),
    [
        ((30, 10, 10, 30), "inverted"),
        ((11, 10, 10, 30), "inverted"),
        ((10, 30, 30, 10), "inverted"),
        ((100, 10, 120, 30), "outside"),
        ((65, 10, 70, 30), "outside"),  # starts right of the last pixel column (64)
        ((-40, -40, -20, -20), "outside"),
        ((0, 5, 0, 9), "outside"),  # column 0 is left of the first pixel (1-based)
    ],
)
def test_degenerate_boxes_are_dropped(voc_writer, corners, why):
    voc_writer.add("a", [("cat", corners, 0), ("dog", (2, 2, 20, 20), 0)], size=(64, 48))
    ds = _dataset(voc_writer)
    assert len(ds) == 1 and ds[0][1]["labels"].tolist() == [1]
    assert why in ds.skipped[0][1] and "dropped" in ds.skipped[0][1]


def test_unknown_class_is_skipped_and_counted_or_strict_fails(voc_writer, caplog):
    voc_writer.add("a", [("cat", (2, 2, 20, 20), 0), ("zebra", (5, 5, 9, 9), 0)])
    voc_writer.add("b", [("zebra", (5, 5, 9, 9), 0)])
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        ds = _dataset(voc_writer)
    assert len(ds) == 2 and ds.unknown_classes == {"zebra": 2}
    assert ds[0][1]["labels"].tolist() == [0] and len(ds[1][1]["labels"]) == 0
    assert "zebra" in caplog.text and "zebra" in ds.summary()
    with pytest.raises(ValueError, match=r"a\.xml.*'zebra'.*classes file"):
        _dataset(voc_writer, strict=True)


def test_missing_difficult_is_zero(voc_writer):
    voc_writer.add("a", [("cat", (2, 2, 20, 20), None)])
    assert _dataset(voc_writer)[0][1]["difficult"].tolist() == [False]


def test_bad_difficult_value_skips_the_file(voc_writer):
    _good(voc_writer)
    voc_writer.add("a", [("cat", (2, 2, 20, 20), 0)])
    path = voc_writer.folder / "Annotations" / "a.xml"
    path.write_text(path.read_text().replace("<difficult>0", "<difficult>maybe"))
    ds = _dataset(voc_writer)
    assert len(ds) == 1 and "difficult='maybe'" in ds.skipped[0][1]


def test_images_without_objects_are_kept(voc_writer):
    voc_writer.add("empty", [])
    ds = _dataset(voc_writer)
    image, target = ds[0]
    assert target["boxes"].shape == (0, 4) and len(target["labels"]) == 0
    _, targets, metas = collate_detection([build_eval_transform(64)(image, target)])
    assert targets.tolist() == [[[-1.0, 0.0, 0.0, 0.0, 0.0]]] and metas[0]["gt"].shape == (0, 6)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty image file"), (b"GIF? no: just some text", "not an image")],
)
def test_zero_byte_and_non_image_files_are_never_returned(voc_writer, content, reason):
    _good(voc_writer)
    path = voc_writer.raw_image("bad", content)
    voc_writer.annotation("bad", [("cat", (2, 2, 20, 20), 0)])
    ds = _dataset(voc_writer)
    assert len(ds) == 1 and ds.skipped == [(str(path), ds.skipped[0][1])]
    assert ds.skipped[0][1].startswith(reason)


def test_missing_image_or_annotation_is_skipped(voc_writer):
    _good(voc_writer)
    voc_writer.annotation("no_image", [("cat", (2, 2, 20, 20), 0)])
    ds = VOCDataset(
        voc_writer.root, voc_writer.write_set(ids=["good", "no_image", "no_xml"]), CLASSES
    )
    assert len(ds) == 1
    reasons = sorted(reason for _, reason in ds.skipped)
    assert reasons[0] == "missing annotation" and reasons[1].startswith("missing image (tried")
    assert "no_image.jpg, no_image.{jpg,jpeg,png,bmp}" in reasons[1]


def _truncated_jpeg(writer: VocWriter, image_id: str) -> Path:
    path = writer.image(image_id, size=(64, 48))
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])  # the header reads, the pixels do not
    return path


def test_truncated_image_is_decoded_and_reported_once(voc_writer, caplog):
    voc_writer.add("a", [("cat", (2, 2, 20, 20), 0)])
    voc_writer.add("b", [("dog", (2, 2, 20, 20), 0)])
    bad = _truncated_jpeg(voc_writer, "b")
    ds = _dataset(voc_writer, transform=build_eval_transform(32))
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        for _ in range(3):  # three epochs
            ids = [ds[(index, 7)][1]["image_id"] for index in range(2)]
            assert ids == ["a", "b"]  # kept, not replaced
    assert caplog.text.count(str(bad)) == 1 and "ends early" in caplog.text
    assert not ds.skipped and not ds[1][1]["unreadable"]


def _spoil_after_scan(writer: VocWriter, image_id: str) -> Path:
    """Replace an image by bytes no decoder reads (a file changed after the scan)."""
    return writer.raw_image(image_id, b"\xff\xd8 not a JPEG any more")


def test_undecodable_image_is_replaced_by_the_next_and_reported(voc_writer, caplog):
    voc_writer.add("a", [("cat", (2, 2, 20, 20), 0)])
    voc_writer.add("b", [("dog", (2, 2, 20, 20), 0)])
    voc_writer.add("c", [("cat", (5, 5, 9, 9), 0)])
    ds = _dataset(voc_writer, transform=build_eval_transform(32))
    bad = _spoil_after_scan(voc_writer, "b")
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        ids = [ds[(index, 7)][1]["image_id"] for index in range(3)]
    assert ids == ["a", "c", "c"]
    assert ds.skipped == [(str(bad), ds.skipped[0][1])] and "decode failed" in ds.skipped[0][1]
    assert caplog.text.count(str(bad)) == 1  # once per file
    torch.testing.assert_close(ds[(1, 5)][0], ds[(2, 5)][0])  # same seed, same substitute
    assert not ds.unreadable and not ds[(1, 5)][1]["unreadable"]


def test_an_epoch_survives_a_bad_file(voc_writer):
    for index in range(6):
        voc_writer.add(f"i{index}", [("cat", (2, 2, 20, 20), 0)])
    _truncated_jpeg(voc_writer, "i4")
    ds = _dataset(voc_writer, transform=build_train_transform(32))
    _spoil_after_scan(voc_writer, "i5")
    loader = build_dataloader(ds, batch_size=4, shuffle=True, seed=0, workers=0)
    images = [batch[0] for batch in loader]
    assert sum(len(batch) for batch in images) == 6


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16", "1"])
def test_any_image_mode_comes_out_rgb(voc_writer, mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"  # saved under .jpg: PIL reads the content
    voc_writer.image("a", mode=mode, fmt=fmt)
    voc_writer.annotation("a", [("cat", (2, 2, 20, 20), 0)])
    with Image.open(voc_writer.folder / "JPEGImages" / "a.jpg") as written:
        assert written.mode == mode
    ds = _dataset(voc_writer)
    image, _ = ds[0]
    assert image.mode == "RGB" and image.size == (64, 48)
    tensor, _ = VOCDataset(
        voc_writer.root, [("test", "trainval")], CLASSES, transform=build_train_transform(32)
    )[0]
    assert tensor.shape == (3, 32, 32)


def test_user_files_are_never_modified(voc_writer):
    voc_writer.add("a", [("cat", (-5, 2, 90, 20), 0), ("zebra", (2, 2, 9, 9), 0)])
    voc_writer.add("b", [("dog", (9, 2, 2, 20), 0)], mode="CMYK")
    _truncated_jpeg(voc_writer, "b")
    voc_writer.raw_annotation("c", "<annotation>")
    voc_writer.write_set()

    def snapshot():
        return {
            str(path): hashlib.md5(path.read_bytes()).hexdigest() + str(path.stat().st_mtime_ns)
            for path in sorted(voc_writer.root.rglob("*"))
            if path.is_file()
        }

    before = snapshot()
    ds = VOCDataset(
        voc_writer.root, [("test", "trainval")], CLASSES, transform=build_train_transform(32)
    )
    for index in range(len(ds)):
        ds[(index, index)]
    assert snapshot() == before


# --------------------------------------------------------------------------------- seeded items


def test_seeded_items_are_reproducible(demo_root):
    ds = VOCDataset(
        demo_root, [("demo", "train")], DEMO_CLASSES, transform=build_train_transform(64)
    )
    first, target = ds[(3, 1234)]
    torch.manual_seed(0)
    again, target_again = ds[(3, 1234)]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(target["boxes"], target_again["boxes"], rtol=0, atol=0)
    other, _ = ds[(3, 1235)]
    assert not torch.equal(first, other)


def test_seeded_items_leave_the_global_generator_alone(demo_root):
    ds = VOCDataset(
        demo_root, [("demo", "train")], DEMO_CLASSES, transform=build_train_transform(64)
    )
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ds[(0, 99)]
    torch.testing.assert_close(torch.rand(3), expected)


class _FixedPairs(torch.utils.data.Sampler):
    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self):
        return len(self.pairs)


def test_seeded_items_match_between_main_process_and_workers(demo_root):
    ds = VOCDataset(
        demo_root, [("demo", "train")], DEMO_CLASSES, transform=build_train_transform(64)
    )
    pairs = [(5, 11), (0, 3), (5, 11), (17, 8)]
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, sampler=_FixedPairs(pairs), num_workers=2, collate_fn=collate_detection
    )
    torch.manual_seed(123)  # the workers' own generators differ from the main process's
    from_workers = torch.cat([images for images, _, _ in loader])
    in_main = torch.stack([ds[pair][0] for pair in pairs])
    torch.testing.assert_close(from_workers, in_main, rtol=0, atol=0)


# --------------------------------------------------------------------------- image files, lookup


def _write_image(writer: VocWriter, name: str, size=(64, 48), fmt="JPEG", exif=None) -> Path:
    pixels = np.random.default_rng(1).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path = writer.folder / "JPEGImages" / name
    Image.fromarray(pixels).save(path, format=fmt, **({"exif": exif} if exif else {}))
    return path


def _xml(filename: str | None, size=(64, 48), objects="") -> str:
    named = f"<filename>{filename}</filename>" if filename else ""
    sized = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    return f"<annotation>{named}{sized}{objects}</annotation>"


def _cat(xmin, ymin, xmax, ymax) -> str:
    corners = f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
    return f"<object><name>cat</name><bndbox>{corners}</bndbox></object>"


def test_images_found_through_filename_then_id_with_any_suffix(voc_writer):
    _write_image(voc_writer, "holiday photo.PNG", size=(40, 30), fmt="PNG")
    voc_writer.raw_annotation("by_name", _xml("holiday photo.PNG", (40, 30)))
    _write_image(voc_writer, "upper.JPEG", size=(50, 30))
    voc_writer.raw_annotation("upper", _xml("elsewhere/upper.jpg", None))  # stale <filename>
    _write_image(voc_writer, "bitmap.BMP", size=(20, 30), fmt="BMP")
    voc_writer.raw_annotation("bitmap", _xml(None, None))
    _write_image(voc_writer, "plain.png", size=(30, 30), fmt="PNG")
    voc_writer.raw_annotation("plain", _xml("plain.png"))
    ds = _dataset(voc_writer)
    assert not ds.skipped and len(ds) == 4
    sizes = [ds[index][0].size for index in range(4)]
    assert sizes == [(40, 30), (50, 30), (20, 30), (30, 30)]
    assert [ds.get_target(i)["orig_size"] for i in range(4)] == [
        (30, 40),
        (30, 50),
        (30, 20),
        (30, 30),
    ]


def test_exif_orientation_6_gives_the_upright_size_and_boxes(voc_writer):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide x 48 high, upright 48 wide x 64 high
    _write_image(voc_writer, "phone.jpg", size=(64, 48), exif=exif)
    voc_writer.raw_annotation("phone", _xml("phone.jpg", (48, 64), _cat(13, 17, 36, 48)))
    ds = _dataset(voc_writer)
    image, target = ds[0]
    assert image.size == (48, 64) and target["orig_size"] == (64, 48)
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[12 / 48, 16 / 64, 36 / 48, 48 / 64]])
    )
    assert not ds.num_clamped and not ds.skipped


def test_an_image_over_the_decompression_bomb_limit_is_skipped_and_reported(
    voc_writer, monkeypatch
):
    _good(voc_writer)
    voc_writer.add("huge", [("cat", (2, 2, 20, 20), 0)], size=(200, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200 x 100 is over it, 64 x 48 not
    ds = _dataset(voc_writer)
    assert len(ds) == 1 and ds.skipped[0][0].endswith("huge.jpg")
    assert ds.skipped[0][1].startswith("too large: 200x100") and "downscale" in ds.skipped[0][1]


# ------------------------------------------------------------------------------------ split files


def test_split_file_with_bom_and_crlf(voc_writer):
    _good(voc_writer)
    voc_writer.add("other", [("dog", (3, 3, 30, 30), 0)])
    path = voc_writer.folder / "ImageSets" / "Main" / "trainval.txt"
    path.write_bytes(b"\xef\xbb\xbfgood\r\nother\r\n")
    ds = VOCDataset(voc_writer.root, [("test", "trainval")], CLASSES)
    assert [ds.get_target(i)["image_id"] for i in range(2)] == ["good", "other"]


def test_split_file_in_another_encoding_is_an_error_naming_it(voc_writer):
    _good(voc_writer)
    path = voc_writer.folder / "ImageSets" / "Main" / "trainval.txt"
    path.write_bytes("good\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"trainval\.txt is not UTF-8"):
        VOCDataset(voc_writer.root, [("test", "trainval")], CLASSES)


def test_duplicate_ids_are_kept_once_and_reported_once(voc_writer, caplog):
    _good(voc_writer)
    voc_writer.add("other", [("dog", (3, 3, 30, 30), 0)])
    sets = voc_writer.write_set(ids=["good", "other", "good", "good", "other"])
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        ds = VOCDataset(voc_writer.root, sets, CLASSES)
    assert len(ds) == 2
    assert len(ds.skipped) == 1 and ds.skipped[0][0].endswith("trainval.txt")
    assert ds.skipped[0][1].startswith("duplicate ids: 3 repeats dropped, each id kept once")
    assert "good x3" in ds.skipped[0][1] and "other x2" in ds.skipped[0][1]
    assert caplog.text.count("duplicate ids") == 1


# ------------------------------------------------------------------------ unreadable, evaluation


def _unreadable_set(writer: VocWriter) -> None:
    """good; missing (no image file); garbage (not an image); nosize (no image, no <size>)."""
    _good(writer)
    writer.annotation("missing", [("dog", (11, 21, 31, 41), 0)], size=(100, 50))
    writer.raw_image("garbage", b"no pixels here")
    writer.annotation("garbage", [("cat", (1, 1, 10, 10), 0)], size=(20, 10))
    writer.annotation("nosize", [("cat", (1, 1, 10, 10), 0)], size=None)
    writer.write_set()


def test_keep_unreadable_keeps_their_ground_truth(voc_writer):
    _unreadable_set(voc_writer)
    ds = _dataset(voc_writer, keep_unreadable=True)
    assert [ds.get_target(i)["image_id"] for i in range(len(ds))] == ["good", "missing", "garbage"]
    assert ds.unreadable == ["missing", "garbage"]
    reasons = dict(ds.skipped)
    assert any("nosize" in path and "no <size>" in why for path, why in reasons.items())
    image, target = ds[1]
    assert image.size == (100, 50) and (np.asarray(image) == 128).all()
    assert target["unreadable"] is True and target["orig_size"] == (50, 100)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.1, 0.4, 0.31, 0.82]]))
    assert ds[0][1]["unreadable"] is False
    batch = [build_eval_transform(32)(*ds[i]) for i in range(3)]
    _, _, metas = collate_detection(batch)
    assert [meta["unreadable"] for meta in metas] == [False, True, True]
    assert "2 unreadable images kept" in ds.summary()


def test_training_default_skips_unreadable_images(voc_writer):
    _unreadable_set(voc_writer)
    ds = _dataset(voc_writer)
    assert len(ds) == 1 and not ds.unreadable and len(ds.skipped) == 3


def test_keep_unreadable_at_decode_time(voc_writer, caplog):
    _good(voc_writer)
    voc_writer.add("later", [("dog", (2, 2, 20, 20), 0)], size=(40, 30))
    ds = _dataset(voc_writer, keep_unreadable=True, transform=build_eval_transform(32))
    bad = _spoil_after_scan(voc_writer, "later")
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        for _ in range(2):
            image, target = ds[(1, 3)]
            assert target["image_id"] == "later" and target["unreadable"] is True
            torch.testing.assert_close(image, torch.full((3, 32, 32), 128 / 255))
    assert ds.unreadable == ["later"] and caplog.text.count(str(bad)) == 1
    assert "count as misses" in caplog.text
