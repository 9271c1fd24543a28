"""The CUDA path against the CPU: decode, the loss and its gradient, postprocess, the evaluator
and the model forward give the CPU's numbers on CUDA; bf16 autocast stays close to fp32.

Every test is marked ``gpu`` (skipped without CUDA, tests/conftest.py). TF32 is off here, so
fp32 on CUDA is fp32. Tolerances: fp32 on the two devices differs only in the order of sums and
in the libraries' exp/sigmoid/softmax, a few units in the last place (float32's is 1.2e-7
relative), so decode, loss terms, gradients and detections agree to 1e-5 relative (gradients:
1e-5 of their largest magnitude); the model forward's bounds are stated at its test. bf16 keeps
8 bits of mantissa (2^-9 = 0.2% rounding per value) at every layer: see the bf16 test.
"""

import pytest
import torch
from torch import nn

from utils.anchors import default_anchors
from utils.metrics import DetectionEvaluator
from yolo.converter import decode
from yolo.loss import YOLOv2Loss
from yolo.model import build_model
from yolo.nms import postprocess

pytestmark = pytest.mark.gpu

CUDA = "cuda"
NUM_CLASSES = 20
GRID = 13


@pytest.fixture(autouse=True)
def _no_tf32():
    """Plain fp32 matmuls and convolutions on CUDA for the duration of a test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_raw(seed: int, batch: int = 4, objectness_shift: float = -1.0) -> torch.Tensor:
    """``[N, A*(5+C), 13, 13]`` float32 raw head output, darknet's channel order."""
    gen = torch.Generator().manual_seed(seed)
    anchors = len(default_anchors())
    raw = torch.randn(batch, anchors, 5 + NUM_CLASSES, GRID, GRID, generator=gen)
    raw[:, :, 4] += objectness_shift
    raw[:, :, 5:] *= 2.0
    return raw.reshape(batch, -1, GRID, GRID)  # [N, A, 5+C, S, S] -> [N, A*(5+C), S, S]


def random_targets(seed: int, batch: int = 4, boxes: int = 8) -> torch.Tensor:
    """``[N, G, 5]`` rows (class, cx, cy, w, h) normalised, some padding (class -1), and near
    twins of some boxes in the same cell, so that ground truths compete for a predictor."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(batch, boxes, 2, generator=gen) * 0.8 + 0.1
    size = torch.rand(batch, boxes, 2, generator=gen) * 0.5 + 0.02
    label = torch.randint(0, NUM_CLASSES, (batch, boxes, 1), generator=gen).float()
    targets = torch.cat([label, centre, size], dim=2)  # [N, G, 5]
    targets[:, 1::4, 1:3] = targets[:, 0::4, 1:3] + 0.01  # twins of rows 0, 4, ... (same cell)
    targets[:, 1::4, 3:5] = targets[:, 0::4, 3:5] * 1.1
    count = torch.randint(boxes // 2, boxes + 1, (batch,), generator=gen)
    targets[torch.arange(boxes) >= count[:, None]] = torch.tensor([-1.0, 0, 0, 0, 0])
    return targets


def test_decode_on_cuda_equals_cpu():
    raw, anchors = random_raw(0), default_anchors()
    expected = decode(raw, anchors)
    got = decode(raw.to(CUDA), anchors.to(CUDA))
    for name, want, have in zip(("boxes", "objectness", "class_probs"), expected, got, strict=True):
        assert have.device.type == CUDA, name
        torch.testing.assert_close(have.cpu(), want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("assignment", ["darknet", "global"])
@pytest.mark.parametrize("seen", [0, 20_000])  # with and without the prior term
def test_loss_terms_and_gradient_on_cuda_equal_cpu(assignment, seen):
    raw, targets = random_raw(1, objectness_shift=0.0), random_targets(2)
    results = {}
    for device in ("cpu", CUDA):
        criterion = YOLOv2Loss(default_anchors(), NUM_CLASSES, assignment=assignment).to(device)
        head = raw.to(device).requires_grad_()
        terms = criterion(head, targets.to(device), seen=seen)
        terms["total"].backward()
        results[device] = ({k: v.detach().cpu() for k, v in terms.items()}, head.grad.cpu())
    (want, want_grad), (have, have_grad) = results["cpu"], results[CUDA]
    assert want["num_dropped"] == have["num_dropped"]
    assert want["coord"] > 0 and want["cls"] > 0 and (want["prior"] > 0) == (seen == 0)
    for name in ("coord", "obj", "noobj", "cls", "prior", "total"):
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    scale = want_grad.abs().max()
    torch.testing.assert_close(have_grad, want_grad, rtol=1e-5, atol=1e-5 * scale)


# -1: a few hundred candidates per image (grouped NMS); +3: an untrained model's every box and
# class (the torchvision batched_nms fallback)
@pytest.mark.parametrize("objectness_shift", [-1.0, 3.0])
def test_postprocess_on_cuda_gives_the_cpu_detections(objectness_shift):
    raw, anchors = random_raw(3, objectness_shift=objectness_shift), default_anchors()
    expected = postprocess(raw, anchors)
    got = postprocess(raw.to(CUDA), anchors.to(CUDA))
    assert len(got) == len(expected)
    for have, want in zip(got, expected, strict=True):
        assert have.device.type == CUDA and have.shape == want.shape and len(want) > 0
        have = have.cpu()
        torch.testing.assert_close(have[:, 5], want[:, 5], rtol=0, atol=0)  # same classes
        torch.testing.assert_close(have[:, :5], want[:, :5], rtol=1e-5, atol=1e-6)


def test_evaluator_fed_cuda_tensors_gives_the_cpu_metrics():
    raw, anchors = random_raw(4, objectness_shift=0.0), default_anchors()
    # ground truths: every 7th CPU detection of each image, shifted a little (some matches)
    ground_truths = [
        torch.cat(
            [(dets[::7, :4] + 0.01).clamp(0, 1), dets[::7, 5:], torch.zeros(len(dets[::7]), 1)], 1
        )
        for dets in postprocess(raw, anchors)
    ]  # [G_i, 6] (x1, y1, x2, y2, class, difficult)
    results = []
    for device in ("cpu", CUDA):
        detections = postprocess(raw.to(device), anchors.to(device))
        evaluator = DetectionEvaluator(NUM_CLASSES)
        evaluator.update(detections, [gt.to(device) for gt in ground_truths])
        results.append(evaluator.compute())
    want, have = results
    assert want["num_images"] == have["num_images"] == len(raw)
    assert 0 < want["map_voc07"] < 1 and 0 < want["map_coco"] < 1
    for key in ("map_voc07", "map_voc12", "map_coco", "ap50_coco", "ap75_coco"):
        assert have[key] == pytest.approx(want[key], abs=1e-6), key


def darknet19_and_images(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """darknet19 as built (random init) and ``[2, 3, 416, 416]`` images in [0, 1]."""
    torch.manual_seed(seed)
    images = torch.rand(2, 3, 416, 416, generator=torch.Generator().manual_seed(seed))
    return build_model("darknet19"), images


def relative_error(have: torch.Tensor, want: torch.Tensor) -> float:
    return float((have.float().cpu() - want).norm() / want.norm())


# Eval mode as built: 1e-5. Training mode (batch statistics) amplifies any difference, about
# 20-fold from input to output with random weights (see the bf16 test), and cuDNN's fp32
# algorithms (e.g. Winograd) round differently from the CPU's by up to ~1e-5 a layer: 2e-3.
@pytest.mark.parametrize(("training", "bound"), [(False, 1e-5), (True, 2e-3)])
def test_model_forward_on_cuda_equals_cpu(training, bound):
    model, images = darknet19_and_images()
    model.train(training)
    with torch.no_grad():
        want = model(images)
        model.to(CUDA, memory_format=torch.channels_last)  # as the engine runs it
        have = model(images.to(CUDA).contiguous(memory_format=torch.channels_last))
    assert relative_error(have, want) < bound


def test_bf16_autocast_forward_is_close_to_fp32():
    """Random weights amplify rounding: in training mode (batch statistics), an input noise of
    2^-9 already moves darknet19's output by about 4% (relative L2, measured on the CPU), and
    bf16 autocast on the CPU lands 6% from fp32; the bound, 25%, catches a broken AMP path
    (inf/NaN, a wrong cast, an fp16 overflow), not bf16's own precision. In eval mode the
    forward is not chaotic (the CPU's bf16 autocast is 3e-4 from fp32): bound 3e-3."""
    model, images = darknet19_and_images()
    model.to(CUDA, memory_format=torch.channels_last)
    images = images.to(CUDA).contiguous(memory_format=torch.channels_last)
    for training, bound in ((True, 0.25), (False, 3e-3)):
        model.train(training)
        with torch.no_grad():
            want = model(images).cpu()
            with torch.autocast(CUDA, dtype=torch.bfloat16):
                have = model(images)
        assert have.dtype == torch.bfloat16 and torch.isfinite(have).all()
        assert relative_error(have, want) < bound, training
