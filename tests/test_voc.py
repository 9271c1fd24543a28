"""utils.voc: text files in any line ending and BOM, split files, the VOC pixel frame, lookup."""

from __future__ import annotations

import numpy as np
import pytest

from utils.data import VOCDataset
from utils.voc import (
    ImageFolder,
    load_classes,
    parse_annotation,
    parse_sets,
    read_split,
    voc_box,
)


def test_load_classes(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n\n  dog \n\n")
    assert load_classes(path) == ("cat", "dog")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_classes(tmp_path / "missing.txt")
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        load_classes(path)
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="'cat'"):
        load_classes(path)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_classes_file_with_bom_and_any_line_end(tmp_path, bom, newline):
    path = tmp_path / "classes.txt"
    path.write_bytes(bom + newline.join(["caf\u00e9".encode(), b"dog", b""]))
    assert load_classes(path) == ("caf\u00e9", "dog")


@pytest.mark.parametrize(
    ("payload", "encoding"),
    [("caf\u00e9\ndog\n", "latin-1"), ("cat\ndog\n", "utf-16")],
)
def test_text_in_another_encoding_is_one_line_naming_the_file(tmp_path, payload, encoding):
    path = tmp_path / "classes.txt"
    path.write_bytes(payload.encode(encoding))
    with pytest.raises(ValueError) as info:
        load_classes(path)
    message = str(info.value)
    assert str(path) in message and "UTF-8" in message and "\n" not in message


def test_parse_sets():
    assert parse_sets(["2007:trainval", "2012:trainval"]) == [
        ("2007", "trainval"),
        ("2012", "trainval"),
    ]
    assert parse_sets("demo:val") == [("demo", "val")]
    for bad in ("2007", "2007:", ":test", "2007:test:x", ""):
        with pytest.raises(ValueError, match="NAME:SPLIT"):
            parse_sets([bad])


def test_read_split_keeps_first_occurrence_and_counts_repeats(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbfb\r\na  1\r\n\r\nb\r\nc -1\r\nb\r\na\r\n")
    ids, repeated = read_split(path)
    assert ids == ["b", "a", "c"]
    assert repeated == {"b": 3, "a": 2}
    path.write_text("x\ny\n")
    assert read_split(path) == (["x", "y"], {})


def _reference_box(corners, width, height):
    """The VOC pixel frame from its definition: the pixels the box covers, counted one by one."""
    xmin, ymin, xmax, ymax = corners
    if xmax < xmin or ymax < ymin:
        return None
    xs = [x for x in range(1, width + 1) if xmin <= x <= xmax]  # 1-based pixel columns
    ys = [y for y in range(1, height + 1) if ymin <= y <= ymax]
    if not xs or not ys:
        return None
    return np.array([(xs[0] - 1) / width, (ys[0] - 1) / height, xs[-1] / width, ys[-1] / height])


def test_voc_box_matches_the_pixels_it_covers_on_random_boxes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        width, height = (int(v) for v in rng.integers(1, 40, size=2))
        corners = tuple(float(v) for v in rng.integers(-10, 50, size=4))
        box, note = voc_box(corners, width, height)
        expected = _reference_box(corners, width, height)
        if expected is None:
            assert box is None and ("inverted" in note or "outside" in note)
            continue
        np.testing.assert_allclose(box, expected, rtol=0, atol=1e-6)
        inside = corners[0] >= 1 and corners[1] >= 1
        inside = inside and corners[2] <= width and corners[3] <= height
        assert note == ("" if inside else "clamped")


def test_voc_box_frame_examples():
    np.testing.assert_allclose(voc_box((11, 21, 31, 41), 100, 50)[0], [0.1, 0.4, 0.31, 0.82])
    one_pixel, note = voc_box((5, 5, 5, 9), 10, 10)  # xmin == xmax: one pixel wide, valid
    np.testing.assert_allclose(one_pixel, [0.4, 0.4, 0.5, 0.9])
    assert note == ""
    whole, _ = voc_box((1, 1, 64, 48), 64, 48)
    np.testing.assert_allclose(whole, [0, 0, 1, 1])
    assert voc_box((6, 1, 5, 3), 10, 10)[0] is None


def test_parse_annotation_reads_filename_and_size(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(
        "<annotation><filename>C:\\Users\\me\\Pictures\\IMG 1.JPG</filename>"
        "<size><width>640.0</width><height>480</height></size></annotation>"
    )
    annotation = parse_annotation(path)
    assert annotation.filename == "IMG 1.JPG" and annotation.size == (640, 480)
    path.write_text("<annotation><size><width>0</width></size></annotation>")
    assert parse_annotation(path).filename is None and parse_annotation(path).size is None


def test_image_folder_prefers_filename_then_id_with_any_suffix_case(tmp_path):
    for name in ("named.png", "a.JPEG", "a.png", "b.Bmp", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    images = ImageFolder(tmp_path)
    assert images.find("a", "named.png") == (tmp_path / "named.png", "")
    assert images.find("a", "gone.jpg") == (tmp_path / "a.JPEG", "")  # .jpeg before .png
    assert images.find("b", None) == (tmp_path / "b.Bmp", "")
    path, tried = images.find("c", "c.gif")
    assert path is None and "c.gif" in tried and "c.{jpg,jpeg,png,bmp}" in tried
    assert str(tmp_path) in tried
    assert ImageFolder(tmp_path / "nope").find("a", None)[0] is None


@pytest.mark.parametrize(
    "line", ["../../../../tmp/outside/evil", "/etc/passwd", "a\\b", "..", "sub/x 1"]
)
def test_read_split_refuses_paths(tmp_path, line):
    path = tmp_path / "train.txt"
    path.write_text(f"ok\n{line}\n")
    with pytest.raises(ValueError, match=r"train\.txt line 2: image id .* is not a file stem"):
        read_split(path)


def test_read_split_ids_with_spaces_and_per_class_flags(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("my photo\nx 1\ny -1\nz 0\nw 2\n two  words \n")
    assert read_split(path)[0] == ["my photo", "x", "y", "z", "w 2", "two  words"]


def test_dataset_reads_an_id_with_a_space_and_refuses_traversal(voc_writer):
    voc_writer.add("my photo", [("dog", (2, 2, 20, 20), False)])
    sets = voc_writer.write_set("train")
    ds = VOCDataset(voc_writer.root, sets, ("dog",))
    assert len(ds) == 1 and ds.get_target(0)["image_id"] == "my photo"
    voc_writer.write_set("train", ids=["../../../../tmp/outside/evil"])
    with pytest.raises(ValueError, match="line 1"):
        VOCDataset(voc_writer.root, sets, ("dog",))
