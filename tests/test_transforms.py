"""utils.transforms against plain loops transcribed from darknet's C (tests/darknet_reference.py)
and boxes against the content they frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.darknet_reference import (
    F32,
    darknet_distort,
    darknet_hsv_to_rgb,
    darknet_letterbox,
    darknet_load_detection,
    darknet_resize,
    darknet_rgb_to_hsv,
)
from utils.transforms import (
    DarknetParams,
    build_eval_transform,
    build_train_transform,
    distort_hsv,
    hsv_to_rgb,
    letterbox_image,
    letterbox_size,
    resize_batch,
    resize_image,
    rgb_to_hsv,
    sample_darknet_params,
    unletterbox_boxes,
)

# -------------------------------------------------------------------------------------- helpers


def _target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.arange(len(boxes)) if labels is None else torch.tensor(labels)
    return {
        "boxes": boxes,
        "labels": labels,
        "difficult": torch.zeros(len(boxes), dtype=torch.bool),
        "image_id": "x",
        "orig_size": (0, 0),
    }


def _random_image(width=90, height=70, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _float(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1) / F32(255))  # [3, H, W]


def _no_colour(size=64, **kwargs):
    return build_train_transform(size, hue=0.0, saturation=1.0, exposure=1.0, **kwargs)


# --------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize(
    ("in_h", "in_w", "out_h", "out_w"),
    [
        *[(7, 5, 13, 11), (13, 11, 7, 5), (1, 9, 4, 6), (9, 1, 6, 4), (1, 1, 3, 5)],
        *[(37, 29, 8, 16), (4, 5, 320, 3), (7, 3, 320, 2)],  # the last two: a dark last row
    ],
)
def test_resize_image_matches_darknet_loop(in_h, in_w, out_h, out_w):
    rng = np.random.default_rng(in_h * 100 + in_w)
    image = rng.random((3, in_h, in_w), dtype=F32)
    expected = darknet_resize(image, out_w, out_h)
    out = resize_image(torch.from_numpy(image), out_h, out_w)
    assert out.shape == (3, out_h, out_w) and out.dtype == torch.float32 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    if out_h == 320:  # (319 * (in_h - 1) / 319) rounds below in_h - 1: darknet darkens that row
        assert expected[:, -1].max() < 1e-5 < image[:, -1].min()


def test_eval_transform_is_darknets_resize_and_keeps_boxes():
    image = _random_image(23, 17)
    target = _target([[0.1, 0.2, 0.5, 0.9]])
    out, out_target = build_eval_transform(32)(image, target)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    expected = darknet_resize(_float(image).numpy(), 32, 32)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_target["boxes"], target["boxes"])
    assert out_target["image_id"] == "x" and out_target is not target


def test_builders_validate_arguments():
    for bad in (100, 0, 416.0):
        with pytest.raises(ValueError, match="multiple of 32"):
            build_eval_transform(bad)
    with pytest.raises(ValueError, match="jitter"):
        build_train_transform(64, jitter=0.5)
    with pytest.raises(ValueError, match="saturation"):
        build_train_transform(64, saturation=0.7)
    with pytest.raises(ValueError, match="hue"):
        build_train_transform(64, hue=0.7)


# ------------------------------------------------------------------------------------ letterbox


@pytest.mark.parametrize(("width", "height"), [(23, 17), (11, 30), (20, 20), (45, 7)])
def test_letterbox_matches_darknet_loop(width, height):
    image = _random_image(width, height, seed=width)
    expected = darknet_letterbox(_float(image).numpy(), 32, 32)
    out, out_target = build_eval_transform(32, letterbox=True)(image, _target([[0, 0, 1, 1]]))
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[0.0, 0, 1, 1]]))
    torch.testing.assert_close(letterbox_image(_float(image), 32), out)


def test_letterbox_size_is_darknets_integer_rule():
    assert letterbox_size(500, 375, 416) == (416, 312)  # 375 * 416 // 500 = 312
    assert letterbox_size(375, 500, 416) == (312, 416)
    assert letterbox_size(333, 500, 416) == (277, 416)  # 277.056 truncated
    assert letterbox_size(416, 416, 416) == (416, 416)
    assert letterbox_size(5000, 3, 32) == (32, 1)  # never 0 pixels


@pytest.mark.parametrize(("width", "height"), [(500, 375), (333, 500), (640, 640), (97, 301)])
def test_unletterbox_inverts_darknets_forward_map(width, height):
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.25, 0.35, 0.9]], dtype=torch.float64)
    new_w, new_h = letterbox_size(width, height, 416)
    scale = torch.tensor([new_w, new_h] * 2) / 416
    offset = torch.tensor([416 - new_w, 416 - new_h] * 2) / 2 / 416
    in_network = boxes * scale + offset  # where darknet's region layer sees them
    torch.testing.assert_close(unletterbox_boxes(in_network, width, height, 416), boxes)


def test_unletterboxed_boxes_frame_their_content():
    width, height, size = 150, 61, 128
    pixels = np.full((height, width, 3), 90, dtype=np.uint8)
    pixels[20:41, 30:101] = (255, 0, 0)  # columns 30..100, rows 20..40
    out, _ = build_eval_transform(size, letterbox=True)(Image.fromarray(pixels), _target([]))
    rows, cols = torch.nonzero((out[0] > 0.75) & (out[1] < 0.25), as_tuple=True)
    found = torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]]) / size
    mapped = unletterbox_boxes(found.double(), width, height, size)
    truth = torch.tensor([[30 / width, 20 / height, 101 / width, 41 / height]], dtype=torch.float64)
    pixel = torch.tensor([1 / width, 1 / height] * 2, dtype=torch.float64)
    assert ((mapped - truth).abs() <= 1.5 * pixel).all(), (mapped * 150, truth * 150)


# ------------------------------------------------------------------------------------------- HSV


def _colour_image(height=12, width=12, seed=1) -> np.ndarray:
    """Random colours plus the cases darknet branches on: grey, black, ties, pure colours."""
    rgb = np.random.default_rng(seed).integers(0, 256, (3, height, width)).astype(F32) / F32(255)
    rgb[:, 0] = 0.5  # grey
    rgb[:, 1, :3] = 0.0  # black
    rgb[1, 2] = rgb[0, 2]  # red and green tie for the max (or the min)
    rgb[2, 3] = rgb[1, 3]  # green and blue tie
    rgb[:, 4, :6] = np.eye(3, dtype=F32).repeat(2, 1)  # pure red, green, blue
    return rgb


def test_rgb_to_hsv_matches_darknet_loop():
    rgb = _colour_image()
    expected = darknet_rgb_to_hsv(rgb)
    out = rgb_to_hsv(torch.from_numpy(rgb)).numpy()
    np.testing.assert_allclose(out[1:], expected[1:], rtol=0, atol=0)  # s and v: bit for bit
    coloured = ~np.isnan(expected[0])
    assert coloured.sum() > 100 and (out[0][~coloured] == 0).all()  # grey: NaN there, 0 here
    np.testing.assert_allclose(out[0][coloured], expected[0][coloured], rtol=0, atol=1e-7)


def test_hsv_to_rgb_matches_darknet_loop():
    rng = np.random.default_rng(2)
    hsv = rng.random((3, 16, 16), dtype=F32)
    hsv[0, 0, :7] = np.arange(7, dtype=F32) / 6  # sector starts; h = 1 is darknet's sector 6
    hsv[0, 1, :7] = np.arange(7, dtype=F32) / 6 * F32(0.999999)  # sector ends
    hsv[1] *= F32(1.5)  # saturation scaled past 1, as distort_image leaves it
    hsv[1, 2] = 0  # grey
    expected = darknet_hsv_to_rgb(hsv)
    np.testing.assert_allclose(hsv_to_rgb(torch.from_numpy(hsv)).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("hue", "sat", "val"),
    [(0.05, 1.3, 0.8), (-0.1, 1 / 1.5, 1.5), (0.1, 1.5, 1 / 1.5), (-0.0999, 1.49, 1), (0.5, 2, 1)],
)
def test_distort_hsv_matches_darknet_loop(hue, sat, val):
    rgb = _colour_image()
    image = torch.from_numpy(rgb)
    before = image.clone()
    out = distort_hsv(image, hue, sat, val)
    np.testing.assert_allclose(out.numpy(), darknet_distort(rgb, hue, sat, val), atol=1e-6)
    assert torch.equal(image, before) and out.min() >= 0 and out.max() <= 1


def test_distort_hsv_identity():
    image = torch.rand(3, 9, 7)
    torch.testing.assert_close(distort_hsv(image, 0.0, 1.0, 1.0), image, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- parameters


def test_parameter_distribution():
    torch.manual_seed(0)
    draws = [
        sample_darknet_params(
            100, 50, jitter=0.3, hue=0.1, saturation=1.5, exposure=1.5, flip_p=0.5
        )
        for _ in range(400)
    ]
    assert all(isinstance(d.pleft, int) and -30 <= d.pleft <= 30 for d in draws)
    assert all(-15 <= d.ptop <= 15 and -15 <= d.pbot <= 15 for d in draws)
    assert min(d.pright for d in draws) < -20 and max(d.pright for d in draws) > 20
    assert all(-0.1 <= d.hue <= 0.1 for d in draws)
    for values in ([d.saturation for d in draws], [d.exposure for d in draws]):
        assert all(1 / 1.5 <= v <= 1.5 for v in values)
        assert 150 < sum(v < 1 for v in values) < 250
    assert 150 < sum(d.flip for d in draws) < 250
    still = sample_darknet_params(100, 50, jitter=0, hue=0, saturation=1, exposure=1, flip_p=0)
    assert still == DarknetParams(0, 0, 0, 0, False, 0.0, 1.0, 1.0)


# -------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("seed", range(4))
def test_train_transform_matches_darknets_load_data_detection(seed):
    image = _random_image(23, 17, seed)
    boxes = [[0.05, 0.1, 0.5, 0.6], [0.4, 0.3, 0.95, 0.98], [0.0, 0.0, 0.04, 1.0], [0, 0, 1, 1]]
    target = _target(boxes)
    torch.manual_seed(seed)
    params = sample_darknet_params(23, 17, jitter=0.3, hue=0.1, saturation=1.5, exposure=1.5,
                                   flip_p=0.5)  # fmt: skip
    out, out_target = build_train_transform(32).apply(image, target, params)
    pixels, kept, expected_boxes = darknet_load_detection(image, boxes, params, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), pixels, rtol=0, atol=1e-6)
    assert out_target["labels"].tolist() == kept
    np.testing.assert_allclose(out_target["boxes"].numpy(), expected_boxes, rtol=0, atol=1e-6)
    assert out_target["image_id"] == "x" and len(out_target["difficult"]) == len(kept)


def test_flip_mirrors_image_and_boxes():
    image = _random_image()
    target = _target([[0.1, 0.2, 0.4, 0.9]])
    out, out_target = _no_colour(jitter=0.0, flip_p=1.0)(image, target)
    plain, _ = build_eval_transform(64)(image, target)
    torch.testing.assert_close(out, plain.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[0.6, 0.2, 0.9, 0.9]]))


def test_jitter_crop_boxes_frame_their_content():
    canvas = np.full((150, 200, 3), 128, dtype=np.uint8)
    canvas[40:100, 60:140] = (255, 0, 0)  # the object: columns 60..139, rows 40..99
    image = Image.fromarray(canvas)
    target = _target([[60 / 200, 40 / 150, 140 / 200, 100 / 150]])
    transform = _no_colour(128)
    for seed in range(12):
        torch.manual_seed(seed)
        out, out_target = transform(image, target)
        red = (out[0] > 0.75) & (out[1] < 0.25)  # [S, S]
        rows, cols = torch.nonzero(red, as_tuple=True)
        found = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / 128
        torch.testing.assert_close(out_target["boxes"][0], found.float(), atol=1.5 / 128, rtol=0)


def test_boxes_cropped_away_or_tiny_are_dropped():
    image = _random_image(100, 100)
    target = _target([[0.0, 0.0, 0.1, 0.1], [0.5, 0.5, 0.5004, 0.9], [0.4, 0.4, 0.8, 0.8]])
    params = DarknetParams(20, 0, 0, 0, False, 0.0, 1.0, 1.0)  # cuts off the left 20 pixels
    out_target = _no_colour().apply(image, target, params)[1]
    assert out_target["labels"].tolist() == [2]
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[0.25, 0.4, 0.75, 0.8]]))


def test_padding_repeats_the_edge():
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (200, 10, 10)  # left half red, right half black
    params = DarknetParams(-12, -12, 0, 0, False, 0.0, 1.0, 1.0)  # 64 columns: 12 + 40 + 12
    out, out_target = _no_colour().apply(Image.fromarray(pixels), _target([]), params)
    assert out_target["boxes"].shape == (0, 4)
    red = torch.tensor([200, 10, 10]).view(3, 1, 1) / 255
    torch.testing.assert_close(out[:, :, :12], red.expand(3, 64, 12), atol=1e-6, rtol=0)
    assert torch.all(out[:, :, -12:] == 0)


def test_same_seed_same_augmentation():
    image, target = _random_image(), _target([[0.1, 0.2, 0.5, 0.9]])
    transform = build_train_transform(64)
    torch.manual_seed(11)
    first = transform(image, target)
    torch.manual_seed(11)
    second = transform(image, target)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1]["boxes"], second[1]["boxes"])


# ---------------------------------------------------------------------------------- multi-scale


def test_resize_batch_aligns_corners_as_resize_image():
    images = torch.rand(2, 3, 64, 64)
    assert resize_batch(images, 64) is images
    assert resize_batch(images, 96).shape == (2, 3, 96, 96)
    flat = torch.full((1, 3, 64, 64), 0.25)
    torch.testing.assert_close(resize_batch(flat, 32), torch.full((1, 3, 32, 32), 0.25))
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64)  # 0 at the first column, 1 at the last
    torch.testing.assert_close(resize_batch(ramp, 96)[0, 0, 0], torch.linspace(0, 1, 96))
    by_image = resize_image(images[1], 96, 96)  # but for darknet's last-row rounding
    torch.testing.assert_close(resize_batch(images, 96)[1, :, :-1], by_image[:, :-1])
    torch.testing.assert_close(
        resize_batch(images, 32),
        F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=True),
    )
