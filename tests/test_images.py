"""utils.images: EXIF orientation, truncated files, decompression bombs, unreadable files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from utils.images import UnreadableImage, load_rgb, probe_image


def _photo(path, size=(40, 24), orientation=None, fmt="JPEG"):
    """A random image file; with ``orientation`` it carries that EXIF orientation tag."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if orientation is None:
        image.save(path, format=fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, format=fmt, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillows_exif_transpose(tmp_path, orientation):
    path = _photo(tmp_path / "a.jpg", orientation=orientation)
    image, truncated = load_rgb(path)
    with Image.open(path) as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert not truncated and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert probe_image(path) == image.size  # the scan's size is the upright size


def test_orientation_6_is_upright_and_sideways_in_size(tmp_path):
    path = _photo(tmp_path / "phone.jpg", size=(40, 24), orientation=6)
    with Image.open(path) as raw:
        assert raw.size == (40, 24)
        stored = np.asarray(raw.convert("RGB"))
    image, _ = load_rgb(path)
    assert image.size == (24, 40) and probe_image(path) == (24, 40)
    # orientation 6: the stored picture is turned 90 degrees clockwise to be upright
    assert np.array_equal(np.asarray(image), np.rot90(stored, k=-1))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_decodes_as_far_as_it_goes(tmp_path, fmt):
    path = _photo(tmp_path / "a.img", size=(64, 48), fmt=fmt)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) * 2 // 3])
    image, truncated = load_rgb(path)
    assert truncated and image.size == (64, 48) and image.mode == "RGB"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # scoped to the decode, not left set
    assert load_rgb(_photo(tmp_path / "b.jpg"))[1] is False


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty image file"), (b"just some text", "not an image"), (None, "missing image")],
)
def test_unreadable_files_raise_one_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    for read in (probe_image, load_rgb):
        with pytest.raises(UnreadableImage) as info:
            read(path)
        assert info.value.reason.startswith(reason) and str(path) in str(info.value)
        assert isinstance(info.value, ValueError)


def test_truncated_jpeg_keeps_the_rows_its_data_holds(tmp_path):
    path = _photo(tmp_path / "a.jpg", size=(64, 48))
    with Image.open(path) as whole:
        original = np.asarray(whole.convert("RGB"), dtype=np.float64)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) * 7 // 10])
    pixels = np.asarray(load_rgb(path)[0], dtype=np.float64)
    assert np.array_equal(pixels[:12], original[:12])  # the first rows, decoded as they were
    assert pixels[-8:].std() == 0.0  # no data left: filled in flat by the decoder


# 40x24 = 960 pixels: over the limit (PIL warns) and over twice the limit (PIL raises)
@pytest.mark.parametrize("limit", [900, 400])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, limit):
    path = _photo(tmp_path / "huge.jpg", size=(40, 24))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    for read in (probe_image, load_rgb):
        with pytest.raises(UnreadableImage, match="too large") as info:
            read(path)
        assert "downscale" in info.value.reason
