"""Darknet .weights I/O against files written by an independent writer, the darknet models
against a plain interpreter of darknet's cfgs (layer tables transcribed below), and decoding
against a plain transcription of darknet's region layer."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.anchors import default_anchors
from yolo.converter import decode
from yolo.darknet import (
    darknet_conv_layers,
    darknet_weights_nbytes,
    load_darknet_weights,
    save_darknet_weights,
)
from yolo.model import build_model

# cfg/yolov2-voc.cfg transcribed: ("conv", filters, size, batch_norm, leaky),
# ("max", size, stride), ("route", layers), ("reorg", stride).
YOLOV2_VOC_CFG = [
    ("conv", 32, 3, True, True), ("max", 2, 2), ("conv", 64, 3, True, True), ("max", 2, 2),
    ("conv", 128, 3, True, True), ("conv", 64, 1, True, True), ("conv", 128, 3, True, True),
    ("max", 2, 2), ("conv", 256, 3, True, True), ("conv", 128, 1, True, True),
    ("conv", 256, 3, True, True), ("max", 2, 2), ("conv", 512, 3, True, True),
    ("conv", 256, 1, True, True), ("conv", 512, 3, True, True), ("conv", 256, 1, True, True),
    ("conv", 512, 3, True, True), ("max", 2, 2), ("conv", 1024, 3, True, True),
    ("conv", 512, 1, True, True), ("conv", 1024, 3, True, True), ("conv", 512, 1, True, True),
    ("conv", 1024, 3, True, True), ("conv", 1024, 3, True, True), ("conv", 1024, 3, True, True),
    ("route", (-9,)), ("conv", 64, 1, True, True), ("reorg", 2), ("route", (-1, -4)),
    ("conv", 1024, 3, True, True), ("conv", 125, 1, False, False),
]  # fmt: skip
TINY_VOC_CFG = [  # cfg/yolov2-tiny-voc.cfg
    ("conv", 16, 3, True, True), ("max", 2, 2), ("conv", 32, 3, True, True), ("max", 2, 2),
    ("conv", 64, 3, True, True), ("max", 2, 2), ("conv", 128, 3, True, True), ("max", 2, 2),
    ("conv", 256, 3, True, True), ("max", 2, 2), ("conv", 512, 3, True, True), ("max", 2, 1),
    ("conv", 1024, 3, True, True), ("conv", 1024, 3, True, True), ("conv", 125, 1, False, False),
]  # fmt: skip
# Per conv layer: (input channels, filters, size, batch_norm), in cfg order.
YOLOV2_VOC_CONVS = [
    (3, 32, 3, True), (32, 64, 3, True), (64, 128, 3, True), (128, 64, 1, True),
    (64, 128, 3, True), (128, 256, 3, True), (256, 128, 1, True), (128, 256, 3, True),
    (256, 512, 3, True), (512, 256, 1, True), (256, 512, 3, True), (512, 256, 1, True),
    (256, 512, 3, True), (512, 1024, 3, True), (1024, 512, 1, True), (512, 1024, 3, True),
    (1024, 512, 1, True), (512, 1024, 3, True), (1024, 1024, 3, True), (1024, 1024, 3, True),
    (512, 64, 1, True), (1280, 1024, 3, True), (1024, 125, 1, False),
]  # fmt: skip
TINY_VOC_CONVS = [
    (3, 16, 3, True), (16, 32, 3, True), (32, 64, 3, True), (64, 128, 3, True),
    (128, 256, 3, True), (256, 512, 3, True), (512, 1024, 3, True), (1024, 1024, 3, True),
    (1024, 125, 1, False),
]  # fmt: skip
YOLOV2_VOC_BYTES = 202_704_260
DARKNET19_448_CONV_23_BYTES = 79_327_120


def conv_floats(c_in: int, filters: int, size: int, batch_norm: bool) -> int:
    return filters * (4 if batch_norm else 1) + filters * c_in * size * size


def header_bytes(major: int, minor: int, seen: int) -> bytes:
    wide = major * 10 + minor >= 2
    version = np.array([major, minor, 0], dtype="<i4").tobytes()
    return version + np.array([seen], dtype="<u8" if wide else "<i4").tobytes()


def random_weights(convs: list[tuple], seed: int) -> np.ndarray:
    """Floats of a .weights file for ``convs``: biases, [scales, mean, var], weights (OIHW)."""
    rng = np.random.default_rng(seed)
    floats = np.empty(sum(conv_floats(*c) for c in convs), dtype="<f4")
    pos = 0
    for c_in, filters, size, batch_norm in convs:
        parts = [rng.normal(0.0, 0.1, filters)]  # biases
        if batch_norm:
            parts.append(rng.uniform(0.5, 1.5, filters))  # scales
            parts.append(rng.normal(0.0, 0.1, filters))  # rolling mean
            parts.append(rng.uniform(0.5, 1.5, filters))  # rolling variance
        for part in parts:
            floats[pos : pos + filters] = part
            pos += filters
        weights = floats[pos : pos + filters * c_in * size * size]
        rng.random(out=weights, dtype=np.float32)
        scale = np.float32(2.5 / np.sqrt(c_in * size * size))
        weights *= 2 * scale  # uniform(-scale, scale)
        weights -= scale
        pos += weights.size
    return floats


def write_weights(path, floats: np.ndarray, major=0, minor=1, seen=0) -> None:
    with open(path, "wb") as f:
        f.write(header_bytes(major, minor, seen))
        f.write(floats.astype("<f4").tobytes())


def reorg_c_loop(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Darknet's reorg_cpu(x, w, h, c, batch, stride, forward=0, out), index for index."""
    batch, c, h, w = x.shape
    src = x.flatten().tolist()
    out = [0.0] * len(src)
    out_c = c // (stride * stride)
    for b in range(batch):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2 = k % out_c
                    offset = k // out_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (c2 + out_c * b))
                    out[in_index] = src[out_index]
    return torch.tensor(out, dtype=x.dtype).view(batch, c * stride**2, h // stride, w // stride)


def darknet_maxpool_reference(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Darknet's maxpool: pad = size-1, offset -pad/2 (C division), -inf outside the input."""
    pad = size - 1
    offset = -(pad // 2)
    h, w = x.shape[-2:]
    out_h, out_w = (h + pad - size) // stride + 1, (w + pad - size) // stride + 1
    padded = torch.full((*x.shape[:2], h + 2 * pad, w + 2 * pad), float("-inf"), dtype=x.dtype)
    padded[..., pad : pad + h, pad : pad + w] = x
    best = torch.full((*x.shape[:2], out_h, out_w), float("-inf"), dtype=x.dtype)
    for n in range(size):
        for m in range(size):
            top, left = pad + offset + n, pad + offset + m
            window = padded[
                ..., top : top + stride * out_h : stride, left : left + stride * out_w : stride
            ]
            best = torch.maximum(best, window)
    return best


def darknet_reference_forward(
    cfg: list[tuple], floats: np.ndarray, x: torch.Tensor
) -> torch.Tensor:
    """Run a darknet cfg with weights read straight from a flat ``.weights`` payload."""
    values = torch.from_numpy(floats)
    pos, outputs = 0, []

    def take(count: int) -> torch.Tensor:
        nonlocal pos
        pos += count
        return values[pos - count : pos]

    for layer in cfg:
        if layer[0] == "conv":
            _, filters, size, batch_norm, leaky = layer
            biases = take(filters).view(1, -1, 1, 1)
            if batch_norm:
                scales, mean, var = (take(filters).view(1, -1, 1, 1) for _ in range(3))
            weights = take(filters * x.shape[1] * size * size)
            x = F.conv2d(x, weights.view(filters, x.shape[1], size, size), padding=size // 2)
            if batch_norm:
                x = (x - mean) / torch.sqrt(var + 1e-5) * scales
            x = x + biases
            x = torch.where(x > 0, x, 0.1 * x) if leaky else x
        elif layer[0] == "max":
            x = darknet_maxpool_reference(x, layer[1], layer[2])
        elif layer[0] == "route":
            x = torch.cat([outputs[len(outputs) + i] for i in layer[1]], dim=1)
        else:
            x = reorg_c_loop(x, layer[1])
        outputs.append(x)
    assert pos == len(values)
    return x


@pytest.fixture(scope="module")
def darknet19_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "yolov2-voc-synthetic.weights"
    floats = random_weights(YOLOV2_VOC_CONVS, seed=0)
    write_weights(path, floats, seen=32013312)
    return path, floats


@pytest.fixture(scope="module")
def darknet19_loaded(darknet19_file):
    model = build_model("darknet19").eval()
    info = load_darknet_weights(model, darknet19_file[0])
    return model, info


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "yolov2-tiny-voc-synthetic.weights"
    floats = random_weights(TINY_VOC_CONVS, seed=1)
    write_weights(path, floats, seen=640)
    return path, floats


def test_layer_tables_match_the_published_file_sizes():
    floats = [conv_floats(*layer) for layer in YOLOV2_VOC_CONVS]
    assert sum(floats) == 50_676_061
    assert 16 + 4 * sum(floats) == YOLOV2_VOC_BYTES
    assert sum(floats[:18]) == 19_831_776  # darknet19_448.conv.23: layers 0-22 = 18 convs
    assert 16 + 4 * sum(floats[:18]) == DARKNET19_448_CONV_23_BYTES


@pytest.mark.parametrize(
    ("name", "convs"), [("darknet19", YOLOV2_VOC_CONVS), ("tiny", TINY_VOC_CONVS)]
)
def test_per_layer_shapes_and_counts_match_the_cfg(name, convs):
    with torch.device("meta"):
        model = build_model(name)
    layers = darknet_conv_layers(model)
    assert len(layers) == len(convs)
    for (conv, bn), (c_in, filters, size, batch_norm) in zip(layers, convs, strict=True):
        assert tuple(conv.weight.shape) == (filters, c_in, size, size)
        assert (bn is not None) == batch_norm
        assert (conv.bias is None) == batch_norm
        params = sum(p.numel() for p in (*conv.parameters(), *(bn.parameters() if bn else ())))
        assert params == filters * c_in * size * size + filters * (2 if batch_norm else 1)
    assert darknet_weights_nbytes(model) == 16 + 4 * sum(conv_floats(*c) for c in convs)


def test_darknet19_file_sizes():
    with torch.device("meta"):
        model = build_model("darknet19")
    assert darknet_weights_nbytes(model) == YOLOV2_VOC_BYTES
    assert darknet_weights_nbytes(model, 18) == DARKNET19_448_CONV_23_BYTES


def test_reorg_loop_reference_is_a_permutation():
    x = torch.arange(2 * 8 * 4 * 6, dtype=torch.float32).view(2, 8, 4, 6)
    out = reorg_c_loop(x, 2)
    assert out.shape == (2, 32, 2, 3)
    assert torch.equal(out.flatten().sort().values, x.flatten())


def test_darknet_maxpool_reference_sizes():
    x = torch.randn(1, 2, 13, 13)
    assert darknet_maxpool_reference(x, 2, 1).shape == (1, 2, 13, 13)
    assert darknet_maxpool_reference(x, 2, 2).shape == (1, 2, 7, 7)
    # size 2 stride 1: the last row/column sees only itself (the -inf padding is on the right)
    assert torch.equal(darknet_maxpool_reference(x, 2, 1)[..., -1, -1], x[..., -1, -1])


def test_load_full_file_sets_every_tensor(tiny_file):
    path, floats = tiny_file
    model = build_model("tiny")
    info = load_darknet_weights(model, path)
    assert info == {
        "major": 0, "minor": 1, "revision": 0, "seen": 640, "header_bytes": 16,
        "layers_loaded": 9, "layers_total": 9,
    }  # fmt: skip
    pos = 0
    for (conv, bn), (_c_in, _filters, _size, batch_norm) in zip(
        darknet_conv_layers(model), TINY_VOC_CONVS, strict=True
    ):
        names = ["bias", "weight", "running_mean", "running_var"] if batch_norm else []
        tensors = [getattr(bn, n) for n in names] if batch_norm else [conv.bias]
        for tensor in [*tensors, conv.weight]:
            expected = torch.from_numpy(floats[pos : pos + tensor.numel()]).view(tensor.shape)
            assert torch.equal(tensor.detach(), expected)
            pos += tensor.numel()
    assert pos == len(floats)


def test_tiny_matches_darknet_reference_forward(tiny_file):
    path, floats = tiny_file
    model = build_model("tiny", pretrained=path).eval()
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = darknet_reference_forward(TINY_VOC_CFG, floats, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_darknet19_matches_darknet_reference_forward(darknet19_file, darknet19_loaded):
    model, info = darknet19_loaded
    assert info["layers_loaded"] == 23 and info["seen"] == 32013312
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = darknet_reference_forward(YOLOV2_VOC_CFG, darknet19_file[1], x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_save_load_round_trip_darknet19(darknet19_loaded, tmp_path):
    model, _ = darknet19_loaded
    path = tmp_path / "out.weights"
    save_darknet_weights(model, path)
    assert path.stat().st_size == YOLOV2_VOC_BYTES
    assert not list(tmp_path.glob("*.tmp"))
    other = build_model("darknet19").eval()
    info = load_darknet_weights(other, path)
    assert (info["major"], info["minor"], info["seen"], info["layers_loaded"]) == (0, 1, 0, 23)
    for (key, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_large_seen_uses_the_wide_header(tiny_file, tmp_path):
    model = build_model("tiny", pretrained=tiny_file[0]).to(memory_format=torch.channels_last)
    path = tmp_path / "wide.weights"
    save_darknet_weights(model, path, seen=2**33)
    assert path.stat().st_size == tiny_file[0].stat().st_size + 4
    assert path.read_bytes()[:20] == header_bytes(0, 2, 2**33)
    assert path.read_bytes()[20:] == tiny_file[0].read_bytes()[16:]  # OIHW despite channels_last
    info = load_darknet_weights(build_model("tiny"), path)
    assert (info["minor"], info["seen"], info["header_bytes"]) == (2, 2**33, 20)


def test_prefix_file_loads_leading_layers_only(darknet19_file, tmp_path):
    _path, floats = darknet19_file
    prefix = tmp_path / "prefix.weights"
    count = sum(conv_floats(*c) for c in YOLOV2_VOC_CONVS[:3])
    write_weights(prefix, floats[:count])
    model = build_model("darknet19")
    untouched = model.head.conv.weight.detach().clone()
    info = load_darknet_weights(model, prefix)
    assert info["layers_loaded"] == 3
    conv3, _ = darknet_conv_layers(model)[2]
    expected = torch.from_numpy(floats[count - conv3.weight.numel() : count])
    assert torch.equal(conv3.weight.detach().flatten(), expected)
    assert torch.equal(model.head.conv.weight, untouched)


def test_backbone_prefix_of_published_size_loads_18_layers(tmp_path):
    path = tmp_path / "darknet19_448.conv.23"
    with open(path, "wb") as f:
        f.write(header_bytes(0, 1, 0))
        f.truncate(DARKNET19_448_CONV_23_BYTES)  # zeros
    model = build_model("darknet19")
    assert load_darknet_weights(model, path)["layers_loaded"] == 18
    conv18, bn18 = darknet_conv_layers(model)[17]
    conv19, _ = darknet_conv_layers(model)[18]
    assert not conv18.weight.any() and not bn18.running_var.any()
    assert conv19.weight.any()


def sized_file(path, num_bytes: int, major: int = 0, minor: int = 1) -> None:
    with open(path, "wb") as f:
        f.write(header_bytes(major, minor, 0))
        f.truncate(num_bytes)


@pytest.mark.parametrize("delta", [-6, -4, 4, 1])
def test_truncated_or_oversized_file_is_refused(tmp_path, delta):
    full = 16 + 4 * sum(conv_floats(*c) for c in TINY_VOC_CONVS)
    path = tmp_path / "bad.weights"
    sized_file(path, full + delta)
    with pytest.raises(ValueError, match="do not fit the tiny model") as err:
        load_darknet_weights(build_model("tiny"), path)
    assert f"{full:,} bytes" in str(err.value) and f"found {full + delta:,} bytes" in str(err.value)


def test_wrong_version_header_is_refused(tiny_file, tmp_path):
    path = tmp_path / "v02.weights"
    data = bytearray(tiny_file[0].read_bytes())
    data[4:8] = np.array([2], dtype="<i4").tobytes()  # minor 2 means a 20-byte header
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="with a 16-byte header the file would fit"):
        load_darknet_weights(build_model("tiny"), path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "junk.weights"
    path.write_bytes(np.array([7, 123456, 3, 0, 1], dtype="<i4").tobytes())
    with pytest.raises(ValueError, match=r"not a darknet \.weights file"):
        load_darknet_weights(build_model("tiny"), path)


def test_yolo_voc_2_0_is_named(tmp_path):
    path = tmp_path / "yolo-voc.weights"
    sized_file(path, 268_632_452)
    with torch.device("meta"):
        model = build_model("darknet19")
    with pytest.raises(ValueError, match=r"yolo-voc\.2\.0\.cfg") as err:
        load_darknet_weights(model, path)
    assert "202,704,260 bytes" in str(err.value) and "darknet19_448.conv.23" in str(err.value)


def test_other_class_count_is_explained(tiny_file):
    with pytest.raises(ValueError, match="prediction layer has 125 filters; this model's has 40"):
        load_darknet_weights(build_model("tiny", num_classes=3), tiny_file[0])


def test_resnet_has_no_darknet_layout(tmp_path):
    with torch.device("meta"):
        model = build_model("resnet18")
    with pytest.raises(ValueError, match="darknet19 and tiny models only"):
        save_darknet_weights(model, tmp_path / "r.weights")


# cfg/yolov2-voc.cfg, [region]: the anchors line, in cells of the 13x13 grid of a 416 input
YOLOV2_VOC_ANCHORS_LINE = (
    "1.3221, 1.73145, 3.19275, 4.00944, 5.05587, 8.09892, 9.47112, 4.84053, 11.2364, 10.0071"
)


def region_layer_reference(raw: torch.Tensor, biases: list[float], thresh: float) -> dict:
    """darknet's forward_region_layer at inference and get_region_boxes, as plain loops over
    one image's raw output ``[A*(5+C), H, W]`` (entry k of anchor n at channel n*(5+C) + k,
    entry_index): logistic on x, y and objectness, softmax over the classes; get_region_box
    with DOABS, box = ((col + x) / w, (row + y) / h, exp(tw) * biases[2n] / w,
    exp(th) * biases[2n+1] / h); probs[j] = objectness * p[j] where that is > thresh, else 0.
    Returns ``{(row, col, n): ((x, y, w, h), objectness, probs)}``."""
    values = raw.tolist()
    num_anchors = len(biases) // 2
    size = len(values) // num_anchors
    grid_h, grid_w = len(values[0]), len(values[0][0])
    detections = {}
    for row in range(grid_h):
        for col in range(grid_w):
            for n in range(num_anchors):
                entry = [values[n * size + k][row][col] for k in range(size)]
                x, y, scale = (1 / (1 + math.exp(-entry[k])) for k in (0, 1, 4))
                largest = max(entry[5:])
                exps = [math.exp(v - largest) for v in entry[5:]]
                probs = [scale * e / sum(exps) for e in exps]
                box = (
                    (col + x) / grid_w,
                    (row + y) / grid_h,
                    math.exp(entry[2]) * biases[2 * n] / grid_w,
                    math.exp(entry[3]) * biases[2 * n + 1] / grid_h,
                )
                detections[row, col, n] = (box, scale, [p if p > thresh else 0.0 for p in probs])
    return detections


@pytest.mark.slow
def test_darknet19_weights_decode_at_608_as_darknets_region_layer(tmp_path):
    parsed = [float(v) for v in YOLOV2_VOC_ANCHORS_LINE.split(",")]
    biases = torch.tensor(parsed, dtype=torch.float32).tolist()  # darknet's float biases
    anchors = default_anchors()
    assert anchors.flatten().tolist() == biases
    torch.manual_seed(3)
    seeded = build_model("darknet19")
    with torch.no_grad():  # scores on both sides of the threshold
        seeded.head.conv.bias.view(5, 25)[:, 4:] = 2 * torch.randn(5, 21)  # [A*(5+C)] -> [A, 5+C]
    path = tmp_path / "seeded.weights"
    save_darknet_weights(seeded, path)
    model = build_model("darknet19", pretrained=path).eval()
    image = torch.rand(1, 3, 608, 608, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw = model(image).double()  # [1, 125, 19, 19]
    thresh = 0.002
    reference = region_layer_reference(raw[0], biases, thresh)
    boxes, objectness, class_probs = decode(raw, anchors.double())
    scores = objectness[0, :, None] * class_probs[0]  # [P, C]
    expected_boxes, expected_objectness, expected_scores = [], [], []
    for row, col, n in sorted(reference, key=lambda k: (k[0] * 19 + k[1]) * 5 + k[2]):
        (x, y, w, h), scale, probs = reference[row, col, n]
        expected_boxes.append([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
        expected_objectness.append(scale)
        expected_scores.append(probs)
    torch.testing.assert_close(boxes[0], torch.tensor(expected_boxes, dtype=torch.float64))
    torch.testing.assert_close(
        objectness[0], torch.tensor(expected_objectness, dtype=torch.float64)
    )
    kept_scores = torch.where(scores > thresh, scores, 0.0)
    torch.testing.assert_close(kept_scores, torch.tensor(expected_scores, dtype=torch.float64))
    assert 0 < int((kept_scores > 0).sum()) < kept_scores.numel()
    size_px = (boxes[0, :, 2:] - boxes[0, :, :2]) * 608  # anchors are 32 pixels a cell
    torch.testing.assert_close(size_px[0], raw[0, 2:4, 0, 0].exp() * anchors[0].double() * 32)
