"""utils.transforms: darknet's augmentation against slow references, boxes against content."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from utils.transforms import (
    MULTISCALE_SIZES,
    DarknetParams,
    _distort_hsv_uint8,
    _replicate_edges,
    build_eval_transform,
    build_train_transform,
    distort_hsv,
    resize_batch,
    sample_darknet_params,
)


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


def _no_colour(**kwargs):
    return build_train_transform(64, hue=0.0, saturation=1.0, exposure=1.0, **kwargs)


# ------------------------------------------------------------------------------------ evaluation


def test_eval_transform_resizes_and_keeps_boxes():
    image = _random_image()
    target = _target([[0.1, 0.2, 0.5, 0.9]])
    out, out_target = build_eval_transform(64)(image, target)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out_target["boxes"], target["boxes"])
    assert out_target["image_id"] == "x" and out_target is not target
    smooth = image.resize((30, 20)).resize((90, 70), Image.BILINEAR)  # low detail: kernels agree
    pil = torch.from_numpy(np.array(smooth.resize((64, 64), Image.BILINEAR))).permute(2, 0, 1)
    assert (build_eval_transform(64)(smooth, target)[0] - pil / 255).abs().mean() < 0.01


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


# ------------------------------------------------------------------------------------------- HSV


def _distort_reference(rgb: np.ndarray, hue: float, sat: float, val: float) -> np.ndarray:
    """darknet's distort_image pixel by pixel with colorsys (saturation not clamped)."""
    out = np.empty_like(rgb)
    for index, pixel in enumerate(rgb.reshape(-1, 3)):
        h, s, v = colorsys.rgb_to_hsv(*pixel)
        out.reshape(-1, 3)[index] = colorsys.hsv_to_rgb((h + hue) % 1.0, s * sat, v * val)
    return np.clip(out, 0, 1)


@pytest.mark.parametrize(
    ("hue", "sat", "val"),
    [
        (0.05, 1.3, 0.8),
        (-0.1, 1 / 1.5, 1.5),
        (0.1, 1.5, 1 / 1.5),
        (-0.0999, 1.49, 1.0),
        (0.5, 2, 1),
    ],
)
def test_distort_hsv_matches_colorsys(hue, sat, val):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 12, 3)).astype(np.float32) / 255
    rgb[0] = 0.5  # grey
    rgb[1, :, 1] = rgb[1, :, 0]  # ties between channels
    rgb[2, :, 2] = rgb[2, :, 0]
    rgb[3, :] = (1.0, 0.0, 0.0)  # pure red, on a sector boundary
    image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # [3, H, W]
    before = image.clone()
    out = distort_hsv(image, hue, sat, val).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, _distort_reference(rgb, hue, sat, val), atol=2e-6)
    assert torch.equal(image, before)


def test_uint8_path_matches_the_float_path():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    pixels[:4] = 77  # grey
    image_u8 = torch.from_numpy(pixels).permute(2, 0, 1)  # [3, H, W], channels-last strides
    out = torch.full((3, 30, 30), -1.0)
    region = out[:, 3:23, 5:29]
    _distort_hsv_uint8(image_u8, 0.07, 1.4, 1 / 1.3, out=region)
    expected = distort_hsv(image_u8.float() / 255, 0.07, 1.4, 1 / 1.3)
    torch.testing.assert_close(region, expected, atol=1e-6, rtol=0)
    assert (out[:, :3] == -1).all() and (out[:, :, :5] == -1).all()  # nothing outside


def test_replicate_edges_matches_replicate_padding():
    inner = torch.rand(3, 5, 7)
    out = torch.zeros(3, 12, 16)
    out[:, 2:7, 4:11] = inner
    _replicate_edges(out, 2, 7, 4, 11)
    expected = torch.nn.functional.pad(inner[None], (4, 5, 2, 5), mode="replicate")[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


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


# ------------------------------------------------------------------------------------- geometry


def test_train_transform_output_contract():
    image = _random_image()
    target = _target([[0.1, 0.2, 0.5, 0.9], [0.6, 0.6, 0.7, 0.7]], labels=[4, 2])
    torch.manual_seed(3)
    out, out_target = build_train_transform(64)(image, target)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() >= 0 and out.max() <= 1
    boxes = out_target["boxes"]
    assert boxes.dtype == torch.float32 and ((boxes >= 0) & (boxes <= 1)).all()
    assert len(boxes) == len(out_target["labels"]) == len(out_target["difficult"])
    assert out_target["image_id"] == "x"


def test_flip_mirrors_image_and_boxes():
    image = _random_image()
    target = _target([[0.1, 0.2, 0.4, 0.9]])
    out, out_target = _no_colour(jitter=0.0, flip_p=1.0)(image, target)
    plain, _ = build_eval_transform(64)(image, target)
    torch.testing.assert_close(out, plain.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[0.6, 0.2, 0.9, 0.9]]))


def _reference_geometry(image, target, params: DarknetParams, size: int):
    """The jitter crop with torchvision v2 ops: edge pad, crop, resize, flip (slow, plain)."""
    width, height = image.size
    pads = [
        max(0, -params.pleft),
        max(0, -params.ptop),
        max(0, -params.pright),
        max(0, -params.pbot),
    ]
    pixels = TF.pil_to_tensor(image)  # [3, H, W] uint8
    boxes = tv_tensors.BoundingBoxes(
        target["boxes"] * torch.tensor([width, height] * 2),
        format="XYXY",
        canvas_size=(height, width),
    )
    pixels = TF.pad(pixels, pads, padding_mode="edge")
    boxes = TF.pad(boxes, pads)
    top, left = max(0, params.ptop), max(0, params.pleft)
    window_h = height - params.ptop - params.pbot
    window_w = width - params.pleft - params.pright
    pixels = TF.crop(pixels, top, left, window_h, window_w)
    boxes = TF.crop(boxes, top, left, window_h, window_w)
    pixels = TF.resize(pixels, [size, size], antialias=True)
    boxes = TF.resize(boxes, [size, size])
    if params.flip:
        pixels, boxes = TF.horizontal_flip(pixels), TF.horizontal_flip(boxes)
    return pixels.float() / 255, boxes.as_subclass(torch.Tensor) / size


@pytest.mark.parametrize("seed", range(6))
def test_jitter_crop_matches_a_torchvision_reference(seed):
    image = _random_image(120, 80, seed).resize((30, 20)).resize((120, 80), Image.BILINEAR)
    target = _target([[0.05, 0.1, 0.5, 0.6], [0.4, 0.3, 0.95, 0.98], [0.3, 0.3, 0.6, 0.6]])
    transform = _no_colour()
    torch.manual_seed(seed)
    params = sample_darknet_params(120, 80, jitter=0.3, hue=0, saturation=1, exposure=1, flip_p=0.5)
    out, out_target = transform.apply(image, target, params)
    ref_image, ref_boxes = _reference_geometry(image, target, params, 64)
    assert (out - ref_image).abs().mean() < 0.01
    ref_boxes = ref_boxes.clamp(0, 1)
    keep = ((ref_boxes[:, 2:] - ref_boxes[:, :2]) >= 0.001).all(-1)
    torch.testing.assert_close(
        out_target["boxes"], ref_boxes[keep], atol=0.6 / 64, rtol=0
    )  # layout rounding
    assert out_target["labels"].tolist() == target["labels"][keep].tolist()


def test_jitter_crop_boxes_frame_their_content():
    canvas = np.full((150, 200, 3), 128, dtype=np.uint8)
    canvas[40:100, 60:140] = (255, 0, 0)  # the object: columns 60..139, rows 40..99
    image = Image.fromarray(canvas)
    target = _target([[60 / 200, 40 / 150, 140 / 200, 100 / 150]])
    transform = build_train_transform(128, hue=0.0, saturation=1.0, exposure=1.0)
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
    params = DarknetParams(-12, -12, 0, 0, False, 0.0, 1.0, 1.0)  # pads both sides
    out, out_target = _no_colour().apply(Image.fromarray(pixels), _target([]), params)
    assert out_target["boxes"].shape == (0, 4)
    left = round(12 * 64 / 64)  # 12 source pixels of padding at 64 / 64 output pixels each
    assert torch.allclose(out[:, :, :left], torch.tensor([200, 10, 10]).view(3, 1, 1) / 255)
    assert torch.all(out[:, :, -left:] == 0)


def test_same_seed_same_augmentation():
    image, target = _random_image(), _target([[0.1, 0.2, 0.5, 0.9]])
    transform = build_train_transform(64)
    torch.manual_seed(11)
    first = transform(image, target)
    torch.manual_seed(11)
    second = transform(image, target)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1]["boxes"], second[1]["boxes"])


# ---------------------------------------------------------------------------------- multi-scale


def test_resize_batch():
    images = torch.rand(2, 3, 64, 64)
    assert resize_batch(images, 64) is images
    assert resize_batch(images, 96).shape == (2, 3, 96, 96)
    flat = torch.full((1, 3, 64, 64), 0.25)
    torch.testing.assert_close(resize_batch(flat, 32), torch.full((1, 3, 32, 32), 0.25))
    assert MULTISCALE_SIZES == (320, 352, 384, 416, 448, 480, 512, 544, 576, 608)
