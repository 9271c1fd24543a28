"""The batched device path (utils.batch_augment) against the per-image CPU path
(utils.transforms.DarknetTrainTransform): same drawn parameters, pixels within 1e-5 (float
rounding: the same sample positions and weights, the same HSV code), boxes and the kept and
dropped ones exactly equal."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from utils.batch_augment import (
    AUGMENT_ON,
    DeferredTrainTransform,
    RawBatch,
    augment_batch,
    collate_raw,
    resolve_augment_on,
    train_pipeline,
)
from utils.data import VOCDataset
from utils.demo import DEMO_CLASSES
from utils.images import load_rgb
from utils.loader import build_dataloader, collate_detection
from utils.transforms import DarknetParams, build_eval_transform, build_train_transform

PIXEL_ATOL = 1e-5


def _noise(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Uniform noise: the largest neighbour differences, so the worst case for the weights."""
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _target(rng: np.random.Generator, count: int = 6, height: int = 1, width: int = 1) -> dict:
    """Random boxes, some tiny or near an edge, so that crops drop some of them."""
    corners = np.sort(rng.uniform(-0.05, 1.05, (count, 2, 2)), axis=1).clip(0, 1)  # [G, lo/hi, xy]
    corners[0, 1] = corners[0, 0] + 0.002  # a box that the resize may leave under .001
    boxes = torch.tensor(corners.reshape(count, 4), dtype=torch.float32)
    return {
        "boxes": boxes,  # (x1, y1, x2, y2)
        "labels": torch.arange(count),
        "difficult": torch.tensor([i % 2 == 0 for i in range(count)]),
        "image_id": "x",
        "orig_size": (height, width),
    }


def _both_paths(images, targets, transform, seeds, *, chunk=16, garbage=True):
    """Each image through the CPU transform and, as one batch, through the device path, with
    the generator seeded alike per image -> (cpu outputs, device images, device targets)."""
    deferred = DeferredTrainTransform(transform)
    cpu, items = [], []
    for image, target, seed in zip(images, targets, seeds, strict=True):
        torch.manual_seed(seed)
        cpu.append(transform(image, target))
        torch.manual_seed(seed)
        items.append(deferred(image, target))
    raw, _, _ = collate_raw(items)
    if garbage:  # the padding is never read: fill it so that a read would show
        for row, (height, width) in enumerate(raw.sizes.tolist()):
            raw.pixels[row, height:] = 255
            raw.pixels[row, :, width:] = 255
    return cpu, augment_batch(raw, transform.img_size, chunk=chunk), [t for _, t in items]


def _assert_equal_paths(cpu, device_images, device_targets):
    assert device_images.shape == (len(cpu), 3, *cpu[0][0].shape[-2:])
    worst = max(
        (out - image).abs().max().item() for (out, _), image in zip(cpu, device_images, strict=True)
    )
    assert worst <= PIXEL_ATOL, worst
    for (_, expected), got in zip(cpu, device_targets, strict=True):
        assert torch.equal(got["boxes"], expected["boxes"])
        assert torch.equal(got["labels"], expected["labels"])
        assert torch.equal(got["difficult"], expected["difficult"])
    return worst


@pytest.mark.parametrize(
    ("size", "jitter", "seed"),
    [(64, 0.3, 0), (96, 0.2, 1), (128, 0.45, 2), (160, 0.0, 3), (96, 0.49, 4), (160, 0.3, 5)],
)
def test_batch_equals_per_image_path(size, jitter, seed):
    rng = np.random.default_rng(seed)
    sides = rng.integers(3, 180, (6, 2))  # different sizes in one batch: padded
    images = [_noise(int(w), int(h), rng) for w, h in sides]
    targets = [_target(rng, height=int(h), width=int(w)) for w, h in sides]
    transform = build_train_transform(size, jitter=jitter, hue=0.5, saturation=2.0, exposure=2.0)
    cpu, out, got = _both_paths(images, targets, transform, range(seed * 10, seed * 10 + 6))
    _assert_equal_paths(cpu, out, got)


@pytest.mark.parametrize("size", [320, 608])
def test_batch_equals_per_image_path_at_training_sizes(size):
    rng = np.random.default_rng(size)
    sides = [(500, 375), (353, 500), (97, 61)]  # VOC-like and small (enlarged a lot)
    images = [_noise(w, h, rng) for w, h in sides]
    targets = [_target(rng, height=h, width=w) for w, h in sides]
    cpu, out, got = _both_paths(images, targets, build_train_transform(size), [1, 2, 3], chunk=2)
    _assert_equal_paths(cpu, out, got)


def test_demo_photos_through_both_loaders(demo_root):
    """VOCDataset + build_dataloader end to end: the same seeds draw the same parameters, so
    the device path's batch is the CPU path's batch (targets and metas equal)."""
    transform = build_train_transform(96)
    kwargs = dict(batch_size=5, shuffle=True, seed=3, workers=0, pin_memory=False)
    datasets = [
        VOCDataset(demo_root, [("demo", "train")], DEMO_CLASSES, transform=t)
        for t in (transform, DeferredTrainTransform(transform))
    ]
    cpu = build_dataloader(datasets[0], **kwargs)
    device = build_dataloader(datasets[1], collate_fn=collate_raw, **kwargs)
    for loader in (cpu, device):
        loader.sampler.set_epoch(2)
    for (images, targets, metas), (raw, raw_targets, raw_metas) in zip(cpu, device, strict=True):
        assert isinstance(raw, RawBatch) and raw.pixels.dtype == torch.uint8
        assert (augment_batch(raw, 96) - images).abs().max() <= PIXEL_ATOL
        assert torch.equal(raw_targets, targets)
        for meta, raw_meta in zip(metas, raw_metas, strict=True):
            assert meta.keys() == raw_meta.keys() and torch.equal(meta["gt"], raw_meta["gt"])


def test_a_worker_sends_the_raw_batch(demo_root):
    """From a worker process (the batch made in shared memory, sent through its queue)."""
    transform = build_train_transform(64)
    batches = []
    for workers, collate, wrapped in ((1, collate_raw, DeferredTrainTransform(transform)),
                                      (0, collate_detection, transform)):  # fmt: skip
        dataset = VOCDataset(demo_root, [("demo", "train")], DEMO_CLASSES, transform=wrapped)
        loader = build_dataloader(dataset, batch_size=4, shuffle=False, seed=0, workers=workers,
                                  pin_memory=False, collate_fn=collate)  # fmt: skip
        batches.append(next(iter(loader))[0])
    raw, images = batches
    assert len(raw) == 4 and raw.pixels.is_shared()
    torch.testing.assert_close(augment_batch(raw, 64), images, atol=PIXEL_ATOL, rtol=0)


@pytest.mark.parametrize(("size", "window"), [(96, 16), (160, 59), (320, 44)])
def test_darknets_last_row_rounding_is_kept(size, window):
    """Window heights where ``(size - 1) * scale`` rounds below the last row: darknet's last
    row is ``(1 - dy) * row[iy]``, nearly black; the batch makes the same row."""
    rng = np.random.default_rng(size)
    image = _noise(40, window, rng)
    transform = build_train_transform(size, jitter=0.0, hue=0.0, saturation=1.0, exposure=1.0)
    cpu, out, _ = _both_paths([image, _noise(50, 120, rng)], [_target(rng)] * 2, transform, [0, 1])
    floats = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # [3, h, w]
    plain = F.interpolate(floats[None], size=(size, size), mode="bilinear", align_corners=True)[0]
    assert (plain[:, -1] - cpu[0][0][:, -1]).abs().max() > 0.1  # the rounding did happen
    torch.testing.assert_close(out[0], cpu[0][0], atol=PIXEL_ATOL, rtol=0)


def test_crop_outside_the_image_repeats_its_edge():
    """Negative offsets (window larger than the image) clamp to the image's own edge, not the
    batch's padded one, in a batch with a larger image."""
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (200, 10, 10)  # left half red, right half black
    image = Image.fromarray(pixels)
    params = DarknetParams(-12, -12, -8, -8, False, 0.0, 1.0, 1.0)  # 64 x 56 window
    deferred = DeferredTrainTransform(build_train_transform(64))
    pixels_t, target = deferred(image, _target(np.random.default_rng(0)))
    target["augment"] = params
    big = torch.zeros(90, 70, 3, dtype=torch.uint8)
    raw, _, _ = collate_raw([(pixels_t, target), (big, dict(target))])
    raw.pixels[0, 40:] = raw.pixels[0, :, 40:] = 255  # padding: would show as white
    out = augment_batch(raw, 64)[0]
    expected, _ = deferred.transform.apply(image, _target(np.random.default_rng(0)), params)
    torch.testing.assert_close(out, expected, atol=PIXEL_ATOL, rtol=0)
    red = torch.tensor([200, 10, 10]).view(3, 1, 1) / 255
    torch.testing.assert_close(out[:, :, :12], red.expand(3, 64, 12), atol=1e-6, rtol=0)
    assert torch.all(out[:, :, -12:] == 0)


def test_flip_and_chunks():
    """A forced flip mirrors the unflipped batch; chunks change nothing."""
    rng = np.random.default_rng(7)
    images = [_noise(70, 50, rng), _noise(33, 81, rng), _noise(64, 64, rng)]
    items = []
    for flip in (False, True):
        for image in images:
            pixels, target = DeferredTrainTransform(build_train_transform(64))(image, _target(rng))
            target["augment"] = DarknetParams(3, -4, -2, 5, flip, 0.05, 1.3, 0.8)
            items.append((pixels, target))
    raw, _, _ = collate_raw(items)
    whole = augment_batch(raw, 64, chunk=6)
    assert torch.equal(augment_batch(raw, 64, chunk=4), whole)
    torch.testing.assert_close(whole[3:], whole[:3].flip(-1), atol=1e-6, rtol=0)


def test_same_seed_same_parameters_as_the_cpu_path():
    """The worker draws what the per-image transform draws, and no more numbers."""
    transform = build_train_transform(64)
    deferred = DeferredTrainTransform(transform)
    rng = np.random.default_rng(0)
    image, target = _noise(90, 70, rng), _target(rng)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = transform.draw_params(90, 70)
        torch.manual_seed(seed)
        transform(image, target)
        after_cpu = torch.rand(3)
        torch.manual_seed(seed)
        _, drawn = deferred(image, target)
        assert drawn["augment"] == expected and torch.equal(torch.rand(3), after_cpu)


def test_resolve_augment_on_and_bad_input():
    assert AUGMENT_ON == ("auto", "cpu", "device")
    assert resolve_augment_on("auto", torch.device("cpu")) == "cpu"
    assert resolve_augment_on("auto", "cuda:1") == "device"
    assert resolve_augment_on("device", "cpu") == "device"
    assert resolve_augment_on("cpu", "cuda") == "cpu"
    transform = build_train_transform(64)
    assert train_pipeline(transform, "auto", "cpu") == (transform, collate_detection)
    deferred, collate = train_pipeline(transform, "auto", "cuda")
    assert deferred.transform is transform and collate is collate_raw
    with pytest.raises(ValueError, match="augment_on must be one of auto, cpu, device"):
        resolve_augment_on("gpu", "cpu")
    with pytest.raises(TypeError, match="DarknetTrainTransform"):
        DeferredTrainTransform(build_eval_transform(64))
    with pytest.raises(ValueError, match="RGB"):
        DeferredTrainTransform(build_train_transform(64))(Image.new("L", (8, 8)), {})


@pytest.mark.gpu
def test_cuda_batch_equals_cpu_batch():
    rng = np.random.default_rng(11)
    sides = rng.integers(20, 400, (8, 2))
    images = [_noise(int(w), int(h), rng) for w, h in sides]
    targets = [_target(rng) for _ in sides]
    transform = build_train_transform(320, hue=0.5, saturation=2.0, exposure=2.0)
    deferred = DeferredTrainTransform(transform)
    items = []
    for seed, (image, target) in enumerate(zip(images, targets, strict=True)):
        torch.manual_seed(seed)
        items.append(deferred(image, target))
    raw, _, _ = collate_raw(items)
    on_cpu = augment_batch(raw, 320)
    on_cuda = augment_batch(raw.pin_memory().to("cuda", non_blocking=True), 320)
    assert on_cuda.device.type == "cuda"
    # CUDA divides by a number through its reciprocal (a last-bit difference in hue): a pixel
    # whose shifted hue lands on exactly 1.0 on one device only takes darknet's other formula
    # there (hsv_to_rgb's sector 6), about one value in 10^7 on photos; allow 1 in 10^6
    far = (on_cuda.cpu() - on_cpu).abs() > PIXEL_ATOL
    assert far.sum() <= on_cpu.numel() // 10**6, far.sum()


# the public raccoon set (github.com/datitran/raccoon_dataset) cloned as docs/own-data.md says
RACCOON = Path(
    os.environ.get("YOLO_RACCOON_DIR", Path(__file__).parents[1] / "data/raccoon_dataset")
)


@pytest.mark.skipif(not RACCOON.is_dir(), reason="the raccoon set is not here: clone "
                    "github.com/datitran/raccoon_dataset into data/raccoon_dataset, or set "
                    "YOLO_RACCOON_DIR to a folder with images/ and annotations/")  # fmt: skip
@pytest.mark.parametrize("size", [320, 416, 608])
def test_real_photos_give_the_per_image_paths_pixels_and_boxes(size):
    """Photos of many sizes (grey ones too) with jitter, flips and HSV, 12 a size. Darknet's
    hue wraps at exactly 1.0 (hsv_to_rgb's sector 6): a pixel whose shifted hue lands on it
    can round either way, so a few values in a million may jump; every other is within 1e-5."""
    paths = sorted((RACCOON / "images").glob("*.jpg"))[size % 7 :: 17][:12]
    images = [load_rgb(path)[0] for path in paths]
    rng = np.random.default_rng(size)
    targets = [_target(rng, height=image.height, width=image.width) for image in images]
    cpu, out, got = _both_paths(images, targets, build_train_transform(size), range(12), chunk=4)
    pairs = zip(cpu, out, strict=True)
    off = sum(((o - image).abs() > PIXEL_ATOL).sum().item() for (o, _), image in pairs)
    assert off <= out.numel() // 1_000_000, off
    for (_, expected), target in zip(cpu, got, strict=True):
        assert torch.equal(target["boxes"], expected["boxes"])
        assert torch.equal(target["labels"], expected["labels"])
