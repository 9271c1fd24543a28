"""utils.data: VOC parsing, bad input, seeded items, sampler, collate, loader, download."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import VocWriter
from utils import data
from utils.data import (
    VOC_CLASSES,
    SeededSampler,
    VOCDataset,
    build_dataloader,
    collate_detection,
    download_voc,
    load_classes,
    parse_sets,
)
from utils.demo import DEMO_CLASSES
from utils.transforms import build_eval_transform, build_train_transform

CLASSES = ("cat", "dog")


def _dataset(writer: VocWriter, **kwargs) -> VOCDataset:
    kwargs.setdefault("classes", CLASSES)
    return VOCDataset(writer.root, writer.write_set(), **kwargs)


# --------------------------------------------------------------------------------- classes, sets


def test_voc_classes_standard_order():
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person"
    assert VOC_CLASSES[-1] == "tvmonitor"


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


def test_parse_sets():
    assert parse_sets(["2007:trainval", "2012:trainval"]) == [
        ("2007", "trainval"),
        ("2012", "trainval"),
    ]
    assert parse_sets(["demo:val"]) == [("demo", "val")]
    for bad in ("2007", "2007:", ":test", "2007:test:x", ""):
        with pytest.raises(ValueError, match="NAME:SPLIT"):
            parse_sets([bad])


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


def test_box_convention_follows_voc_label(voc_writer):
    voc_writer.add("a", [("dog", (11, 21, 31, 41), 0)], size=(100, 50))
    _, target = _dataset(voc_writer)[0]
    expected = torch.tensor([[10 / 100, 20 / 50, 30 / 100, 40 / 50]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [1] and target["difficult"].tolist() == [False]


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


def test_missing_set_file_says_how_to_get_voc(tmp_path, demo_root):
    with pytest.raises(FileNotFoundError, match=r"VOC2007.*--download"):
        VOCDataset(tmp_path, [("2007", "trainval")])
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/nosuch\.txt.*--download"):
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
        target["boxes"], torch.tensor([[10 / 80, 10 / 40, 30 / 80, 20 / 40]])
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
        ((10, 10, 10, 30), "zero-area"),
        ((10, 10, 30, 10), "zero-area"),
        ((30, 10, 10, 30), "inverted"),
        ((10, 30, 30, 10), "inverted"),
        ((100, 10, 120, 30), "outside"),
        ((-40, -40, -20, -20), "outside"),
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
    assert sorted(reason for _, reason in ds.skipped) == ["missing annotation", "missing image"]


def _truncated_jpeg(writer: VocWriter, image_id: str) -> Path:
    path = writer.image(image_id, size=(64, 48))
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])  # the header reads, the pixels do not
    return path


def test_truncated_image_is_replaced_by_the_next_and_reported(voc_writer, caplog):
    voc_writer.add("a", [("cat", (2, 2, 20, 20), 0)])
    voc_writer.add("b", [("dog", (2, 2, 20, 20), 0)])
    voc_writer.add("c", [("cat", (5, 5, 9, 9), 0)])
    bad = _truncated_jpeg(voc_writer, "b")
    ds = _dataset(voc_writer, transform=build_eval_transform(32))
    assert len(ds) == 3 and not ds.skipped  # the header still reads: found at decode time
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        ids = [ds[(index, 7)][1]["image_id"] for index in range(3)]
    assert ids == ["a", "c", "c"]
    assert ds.skipped == [(str(bad), ds.skipped[0][1])] and "decode failed" in ds.skipped[0][1]
    assert caplog.text.count(str(bad)) == 1  # once per file
    torch.testing.assert_close(ds[(1, 5)][0], ds[(2, 5)][0])  # same seed, same substitute


def test_an_epoch_survives_a_bad_file(voc_writer):
    for index in range(6):
        voc_writer.add(f"i{index}", [("cat", (2, 2, 20, 20), 0)])
    _truncated_jpeg(voc_writer, "i5")
    ds = _dataset(voc_writer, transform=build_train_transform(32))
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


# ------------------------------------------------------------------------------------ the sampler


def _epoch(sampler: SeededSampler, epoch: int, start: int = 0) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch, start)
    pairs = list(sampler)
    assert len(pairs) == len(sampler)
    return pairs


def test_sampler_is_a_seeded_permutation():
    sampler = SeededSampler(50, shuffle=True, seed=3)
    epoch0 = _epoch(sampler, 0)
    assert sorted(index for index, _ in epoch0) == list(range(50))
    assert epoch0 == _epoch(SeededSampler(50, shuffle=True, seed=3), 0)
    assert [i for i, _ in epoch0] != [i for i, _ in _epoch(sampler, 1)]
    assert [i for i, _ in epoch0] != [
        i for i, _ in _epoch(SeededSampler(50, shuffle=True, seed=4), 0)
    ]
    assert len({seed for _, seed in epoch0}) == 50
    ordered = _epoch(SeededSampler(7, shuffle=False, seed=0), 2)
    assert [index for index, _ in ordered] == list(range(7))


def test_item_seed_depends_on_seed_epoch_index_only():
    seeds_a = dict(_epoch(SeededSampler(30, shuffle=True, seed=1), 4))
    seeds_b = dict(_epoch(SeededSampler(30, shuffle=False, seed=1), 4))
    assert seeds_a == seeds_b
    assert seeds_a != dict(_epoch(SeededSampler(30, shuffle=False, seed=1), 5))


@pytest.mark.parametrize(
    ("length", "replicas", "drop_last"),
    [(10, 3, False), (10, 3, True), (9, 3, False), (2, 4, False)],
)
def test_sampler_shards_like_distributed_sampler(length, replicas, drop_last):
    shards = [
        [
            index
            for index, _ in _epoch(
                SeededSampler(
                    length,
                    shuffle=True,
                    seed=0,
                    num_replicas=replicas,
                    rank=rank,
                    drop_last=drop_last,
                ),
                1,
            )
        ]
        for rank in range(replicas)
    ]
    per_rank = length // replicas if drop_last else -(-length // replicas)
    assert all(len(shard) == per_rank for shard in shards)
    seen = [index for shard in shards for index in shard]
    if drop_last:
        assert len(set(seen)) == len(seen)
    else:
        assert set(seen) == set(range(length))
    reference = torch.utils.data.DistributedSampler(
        range(length), num_replicas=replicas, rank=0, shuffle=False, drop_last=drop_last
    )
    unshuffled = SeededSampler(
        length, shuffle=False, seed=0, num_replicas=replicas, drop_last=drop_last
    )
    assert [index for index, _ in unshuffled] == list(reference)


def test_sampler_start_resumes_mid_epoch():
    sampler = SeededSampler(20, shuffle=True, seed=9, num_replicas=2, rank=1)
    full = _epoch(sampler, 3)
    assert _epoch(sampler, 3, start=4) == full[4:]
    assert _epoch(sampler, 3, start=10) == []
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(3, start=11)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        SeededSampler(10, shuffle=True, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="positive"):
        SeededSampler(0, shuffle=True, seed=0)


# ------------------------------------------------------------------------------ collate, loader


def _target(boxes, labels, difficult=None, image_id="x"):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.int64)
    difficult = torch.zeros(len(labels), dtype=torch.bool) if difficult is None else difficult
    return {
        "boxes": boxes,
        "labels": labels,
        "difficult": difficult,
        "image_id": image_id,
        "orig_size": (10, 20),
    }


def test_collate_pads_and_converts_to_centre_form():
    batch = [
        (torch.rand(3, 32, 32), _target([[0.1, 0.2, 0.5, 0.6]], [3], torch.tensor([True]), "a")),
        (torch.rand(3, 32, 32), _target([[0, 0, 1, 1], [0.5, 0.5, 0.75, 1.0]], [0, 1], None, "b")),
        (torch.rand(3, 32, 32), _target([], [], None, "c")),
    ]
    images, targets, metas = collate_detection(batch)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert targets.shape == (3, 2, 5) and targets.dtype == torch.float32
    torch.testing.assert_close(targets[0, 0], torch.tensor([3.0, 0.3, 0.4, 0.4, 0.4]))
    torch.testing.assert_close(targets[0, 1], torch.tensor([-1.0, 0, 0, 0, 0]))
    torch.testing.assert_close(targets[1, 1], torch.tensor([1.0, 0.625, 0.75, 0.25, 0.5]))
    assert (targets[2, :, 0] == -1).all()
    assert [meta["image_id"] for meta in metas] == ["a", "b", "c"]
    torch.testing.assert_close(metas[0]["gt"], torch.tensor([[0.1, 0.2, 0.5, 0.6, 3.0, 1.0]]))
    assert metas[1]["gt"].shape == (2, 6) and metas[2]["gt"].shape == (0, 6)
    assert metas[0]["orig_size"] == (10, 20)


def test_collate_all_empty_has_one_padding_row():
    _, targets, _ = collate_detection([(torch.rand(3, 8, 8), _target([], []))])
    assert targets.shape == (1, 1, 5) and targets[0, 0, 0] == -1


def test_build_dataloader_is_deterministic_across_worker_counts(demo_root):
    ds = VOCDataset(
        demo_root, [("demo", "train")], DEMO_CLASSES, transform=build_train_transform(64)
    )

    def run(workers):
        loader = build_dataloader(ds, batch_size=5, shuffle=True, seed=1, workers=workers)
        assert isinstance(loader.sampler, SeededSampler) and not loader.pin_memory
        loader.sampler.set_epoch(2, start=3)
        return [(images, targets) for images, targets, _ in loader]

    serial, parallel = run(0), run(2)
    assert [len(images) for images, _ in serial] == [5, 5, 5, 5, 1]  # 24 - 3 items
    for (images_a, targets_a), (images_b, targets_b) in zip(serial, parallel, strict=True):
        torch.testing.assert_close(images_a, images_b, rtol=0, atol=0)
        torch.testing.assert_close(targets_a, targets_b, rtol=0, atol=0)


def test_build_dataloader_drop_last_and_shards(demo_root):
    ds = VOCDataset(
        demo_root, [("demo", "train")], DEMO_CLASSES, transform=build_eval_transform(32)
    )
    loader = build_dataloader(
        ds, batch_size=5, shuffle=False, seed=0, workers=0, drop_last=True, num_replicas=2, rank=1
    )
    assert len(loader) == 2
    ids = [meta["image_id"] for _, _, metas in loader for meta in metas]
    assert ids == [f"{index:06d}" for index in range(1, 20, 2)]


# ------------------------------------------------------------------------------------- download


def _tiny_tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _patch_table(monkeypatch, md5: str, name: str = "VOCtrainval_06-Nov-2007.tar"):
    table = dict(data.VOC_TARBALLS)
    table["2007-trainval"] = (name, "voc2007", md5, "VOC2007/ImageSets/Main/trainval.txt")
    monkeypatch.setattr(data, "VOC_TARBALLS", table)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network in tests")


def test_download_from_mirror_extracts_and_then_skips(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    md5 = _tiny_tar(
        mirror / "VOCtrainval_06-Nov-2007.tar",
        {
            "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt": b"000001\n",
            "VOCdevkit/VOC2007/Annotations/000001.xml": b"<annotation/>",
        },
    )
    _patch_table(monkeypatch, md5)
    root = tmp_path / "VOCdevkit"
    assert download_voc(root, items=["2007-trainval"], mirror=mirror.as_uri()) == root
    assert (root / "VOC2007/ImageSets/Main/trainval.txt").read_bytes() == b"000001\n"
    assert (root / "VOCtrainval_06-Nov-2007.tar").is_file()
    assert not [path for path in root.iterdir() if path.name.startswith(".")]  # no temp left
    monkeypatch.setattr(data.urllib.request, "urlopen", _offline)
    download_voc(root, items=["2007-trainval"])  # extracted already: no network needed
    (root / "VOC2007/ImageSets/Main/trainval.txt").unlink()
    download_voc(root, items=["2007-trainval"])  # the tarball with the right md5 is reused
    assert (root / "VOC2007/ImageSets/Main/trainval.txt").is_file()


def test_download_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _tiny_tar(mirror / "VOCtrainval_06-Nov-2007.tar", {"VOCdevkit/VOC2007/x.txt": b"x"})
    _patch_table(monkeypatch, "0" * 32)
    root = tmp_path / "VOCdevkit"
    with pytest.raises(ValueError, match=r"md5 .* expected 0{32}"):
        download_voc(root, items=["2007-trainval"], mirror=mirror.as_uri())
    assert list(root.iterdir()) == []


def test_download_offline_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", _offline)
    root = tmp_path / "VOCdevkit"
    with pytest.raises(ConnectionError) as info:
        download_voc(root, items=["2012-trainval"])
    message = str(info.value)
    assert "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar" in message
    assert str(root / "VOCtrainval_11-May-2012.tar") in message
    assert str(root / "VOC2012/ImageSets/Main/trainval.txt") in message
    with pytest.raises(ValueError, match="unknown VOC item"):
        download_voc(root, items=["2013-trainval"])


def test_download_refuses_path_traversal(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    md5 = _tiny_tar(mirror / "VOCtrainval_06-Nov-2007.tar", {"VOCdevkit/../../escaped.txt": b"x"})
    _patch_table(monkeypatch, md5)
    with pytest.raises(ValueError, match="unsafe member"):
        download_voc(tmp_path / "VOCdevkit", items=["2007-trainval"], mirror=mirror.as_uri())
    assert not (tmp_path / "escaped.txt").exists()
