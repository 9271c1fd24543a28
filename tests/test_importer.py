"""utils.importer and import_voc.py: a labelling tool's folders -> the VOCdevkit layout."""

from __future__ import annotations

import hashlib
import json
import logging
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.data import VOCDataset
from utils.formats import open_dataset
from utils.importer import MANIFEST, REPORT, import_labelled
from utils.records import dataset_image_ids
from utils.voc import load_classes
from yolo.build import resolve_run_classes
from yolo.config import TrainConfig
from yolo.flags import parse_config

REPO = Path(__file__).resolve().parents[1]


def _image(folder: Path, name: str, size=(48, 32), fmt="JPEG") -> None:
    pixels = np.random.default_rng(len(name)).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(folder / name, format=fmt)


def _xml(folder: Path, name: str, filename: str | None, objects=("cat",)) -> None:
    parts = ["<annotation>", f"<filename>{filename}</filename>" if filename else ""]
    parts += [
        f"<object><name>{obj}</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>"
        f"<ymax>30</ymax></bndbox></object>"
        for obj in objects
    ]
    (folder / name).write_text("".join(parts) + "</annotation>\r\n", encoding="utf-8")


@pytest.fixture
def labelled(tmp_path) -> tuple[Path, Path]:
    """A labelling tool's output with each kind of pairing and of bad file."""
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir()
    annotations.mkdir()
    for name in ("a.jpg", "c.JPG", "d.jpg", "e.jpeg", "f g.jpg", "x.jpg", "bg.jpg", "h.jpg"):
        _image(images, name)
    _image(images, "b.png", fmt="PNG")
    (images / "broken.jpg").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not an image either")
    _xml(annotations, "a.xml", "a.jpg", ("cat", "dog"))
    _xml(annotations, "b.xml", "b.png", ("bird",))
    _xml(annotations, "c.xml", "c.JPG")
    _xml(annotations, "e.xml", "old_name.jpg")  # stale <filename>: paired by stem
    _xml(annotations, "f g.xml", "f g.jpg")  # a space: id f_g
    _xml(annotations, "x.xml", "x.jpg")
    _xml(annotations, "x_copy.xml", "x.jpg")  # the same image again
    _xml(annotations, "bg.xml", "bg.jpg", ())  # no objects: background
    _xml(annotations, "h.xml", None)  # no <filename>: paired by stem
    _xml(annotations, "broken.xml", "broken.jpg")
    _xml(annotations, "orphan.xml", "orphan.jpg")
    (annotations / "bad.xml").write_text("<annotation><object>")
    (annotations / "readme.txt").write_text("hello")
    return images, annotations


def _snapshot(*folders: Path) -> dict[str, str]:
    return {
        str(path): hashlib.md5(path.read_bytes()).hexdigest() + str(path.stat().st_mtime_ns)
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_import_pairs_splits_and_loads(labelled, tmp_path):
    images, annotations = labelled
    before = _snapshot(images, annotations)
    out = tmp_path / "data" / "pets"
    result = import_labelled(images, annotations, out, val=0.25, seed=0)
    assert _snapshot(images, annotations) == before  # nothing moved or edited
    folder = out / "VOCpets"
    ids = ["a", "b", "bg", "c", "e", "f_g", "h", "x"]
    assert result.splits["trainval"] == ids
    assert sorted(result.splits["train"] + result.splits["val"]) == ids
    assert len(result.splits["val"]) == 2
    assert load_classes(out / "classes.txt") == ("bird", "cat", "dog")
    for image_id, xml in [("a", "a.xml"), ("f_g", "f g.xml"), ("x", "x.xml")]:
        copied = (folder / "Annotations" / f"{image_id}.xml").read_bytes()
        assert copied == (annotations / xml).read_bytes()  # byte for byte
    assert (folder / "JPEGImages" / "e.jpeg").read_bytes() == (images / "e.jpeg").read_bytes()
    skipped = dict((Path(file).name, why) for file, why in result.skipped)
    assert set(skipped) == {
        "x_copy.xml",
        "broken.xml",
        "orphan.xml",
        "bad.xml",
        "readme.txt",
        "d.jpg",
    }
    assert "already used by x.xml" in skipped["x_copy.xml"]
    assert skipped["broken.xml"].startswith("its image broken.jpg: not an image")
    assert skipped["orphan.xml"].startswith("no image: tried <filename> orphan.jpg")
    assert skipped["bad.xml"].startswith("malformed XML") and "no XML" in skipped["d.jpg"]
    report = (out / REPORT).read_text()
    assert "8 images (6 train, 2 val), 8 objects, 3 classes" in report
    assert all(f"skipped {file}: {why}" in report for file, why in result.skipped)
    assert "no objects: kept as a background image" in report
    for split in ("train", "val", "trainval"):
        ds = VOCDataset(out, [("pets", split)], load_classes(out / "classes.txt"))
        assert len(ds) == len(result.splits[split]) and not ds.skipped
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["counts"]["val"] == 2


def test_split_is_seeded(labelled, tmp_path):
    images, annotations = labelled
    first = import_labelled(images, annotations, tmp_path / "a" / "set", seed=3).splits
    again = import_labelled(images, annotations, tmp_path / "b" / "set", seed=3).splits
    other = import_labelled(images, annotations, tmp_path / "c" / "set", seed=4).splits
    assert first == again and first["val"] != other["val"]


def test_link_makes_symlinks_to_the_originals(labelled, tmp_path):
    images, annotations = labelled
    out = tmp_path / "linked"
    import_labelled(images, annotations, out, link=True)
    copy = out / "VOClinked" / "JPEGImages" / "a.jpg"
    assert copy.is_symlink() and copy.resolve() == (images / "a.jpg").resolve()
    assert len(VOCDataset(out, [("linked", "trainval")], ("bird", "cat", "dog"))) == 8


def test_a_filename_naming_another_image_is_skipped(tmp_path):
    images, annotations = tmp_path / "i", tmp_path / "a"
    images.mkdir()
    annotations.mkdir()
    for name in ("p.jpg", "q.jpg"):
        _image(images, name)
    _xml(annotations, "p.xml", "p.jpg")
    _xml(annotations, "q.xml", "missing.jpg")  # paired with q.jpg by stem
    _xml(annotations, "r.xml", "p.jpg")  # would load p.jpg: claimed already
    result = import_labelled(images, annotations, tmp_path / "out")
    assert result.splits["trainval"] == ["p", "q"]
    assert [Path(file).name for file, _ in result.skipped] == ["r.xml"]


def test_refuses_a_folder_it_did_not_write_and_redoes_its_own(labelled, tmp_path):
    images, annotations = labelled
    out = tmp_path / "data" / "pets"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not empty and not a previous import.*give its folder"):
        import_labelled(images, annotations, out)
    assert (out / "mine.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    (out / "mine.txt").unlink()
    import_labelled(images, annotations, out, seed=1)
    redone = import_labelled(images, annotations, out, val=0.5)  # a previous import: replaced
    assert len(redone.splits["val"]) == 4
    assert json.loads((out / MANIFEST).read_text())["val"] == 0.5
    assert not [path for path in out.parent.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize(
    ("out", "match"),
    [("images/sub", "overlaps"), (".", "overlaps"), ("data/bad name", "set name")],
)
def test_refuses_bad_out_folders(labelled, tmp_path, monkeypatch, out, match):
    images, annotations = labelled
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        import_labelled(images, annotations, tmp_path / out if out != "." else tmp_path)


def test_nothing_to_import_is_an_error(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=r"no \.xml \(VOC\), \.txt \(YOLO-txt\) or \.json"):
        import_labelled(tmp_path / "i", tmp_path / "a", tmp_path / "out")
    (tmp_path / "a" / "x.xml").write_text("<annotation><filename>x.jpg</filename></annotation>")
    with pytest.raises(ValueError, match="no object in any usable XML"):
        import_labelled(tmp_path / "i", tmp_path / "a", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="images folder"):
        import_labelled(tmp_path / "nope", tmp_path / "a", tmp_path / "out")


# ------------------------------------------------------------------------------------------ CLI


def _main():
    return runpy.run_path(str(REPO / "import_voc.py"))["main"]


def test_cli_imports_and_prints_a_train_command_that_parses(labelled, tmp_path, caplog):
    images, annotations = labelled
    out = tmp_path / "data" / "pets"
    argv = ["--images", str(images), "--annotations", str(annotations), "--out", str(out)]
    with caplog.at_level(logging.INFO):
        assert _main()([*argv, "--val", "0.25", "--seed", "2"]) == 0
    commands = [line for line in caplog.messages[-1].splitlines() if line.startswith("python")]
    assert len(commands) == 2  # a GPU one from darknet's weights, a CPU one from scratch
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["python", "train_yolov2.py"]
        config = parse_config(TrainConfig(), words[2:])  # every flag exists and validates
        assert config.data == str(out / "VOCpets") and config.classes is None
        assert resolve_run_classes(config) == load_classes(out / "classes.txt")
        for split in ("train", "val"):  # the splits the import wrote
            ids = (out / "VOCpets" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
            assert dataset_image_ids(open_dataset(config.data, split)) == ids
    assert "--weights yolov2-voc" in commands[0] and "--preset small" in commands[1]
    assert parse_config(TrainConfig(), shlex.split(commands[1])[2:]).model == "tiny"
    assert "skipped" in caplog.text and REPORT in caplog.text


def test_cli_user_errors_are_one_line(labelled, tmp_path, caplog):
    images, annotations = labelled
    with caplog.at_level(logging.INFO):
        assert _main()(["--images", str(images)]) == 1
        assert "--annotations --out" in caplog.text
        argv = ["--images", str(images), "--annotations", str(annotations)]
        assert _main()([*argv, "--out", str(images)]) == 1
    assert "Traceback" not in caplog.text
    with pytest.raises(SystemExit, match="--val"):
        _main()([*argv, "--out", str(tmp_path / "o"), "--val", "1.5"])
