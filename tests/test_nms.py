"""postprocess against a plain loop transcribed from darknet's get_region_detections and
do_nms_sort (src/region_layer.c, src/box.c): per image and class, greedy NMS on the unclipped
boxes, then clipping, then each image's best scores."""

import pytest
import torch

import yolo.nms
from yolo.converter import decode
from yolo.nms import postprocess

ANCHORS = torch.tensor([[0.6, 0.7], [1.4, 1.75], [2.45, 3.5], [4.2, 2.45], [5.6, 5.25]])  # cells


def random_raw(seed: int, batch=3, grid=(7, 6), num_classes=4, objectness_shift=-1.0, wide=0.0):
    """A random head ``[N, A*(5+C), H, W]``; ``wide`` adds to tw, th (boxes past the image)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, len(ANCHORS), 5 + num_classes, *grid, generator=gen)
    raw[:, :, 4] += objectness_shift
    raw[:, :, 2:4] += wide
    raw[:, :, 5:] *= 2.0
    return raw.reshape(batch, -1, *grid)


def darknet_iou(a: list[float], b: list[float]) -> float:
    """box.c's box_iou on (x, y, w, h) centre boxes, from xyxy corners."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = (
        ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1) for x1, y1, x2, y2 in (a, b)
    )
    overlap_w = min(ax + aw / 2, bx + bw / 2) - max(ax - aw / 2, bx - bw / 2)
    overlap_h = min(ay + ah / 2, by + bh / 2) - max(ay - ah / 2, by - bh / 2)
    inter = 0.0 if overlap_w < 0 or overlap_h < 0 else overlap_w * overlap_h
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def reference(raw, anchors, conf_threshold, nms_threshold, max_detections, clip_first=False):
    """Per image: darknet's detections (objectness > thresh, prob = objectness * class prob,
    kept if > thresh), do_nms_sort per class (a stable sort by prob from the prediction order,
    where darknet's qsort leaves ties unordered), then clip and keep the best scores.
    ``clip_first``: clip before NMS instead (the order this project used before)."""
    boxes, objectness, class_probs = decode(raw.double(), anchors.double())
    num_classes = class_probs.shape[2]
    results = []
    for b in range(raw.shape[0]):
        dets = []  # [box, probs], prediction order
        for p in range(boxes.shape[1]):
            scale = objectness[b, p].item()
            if scale <= conf_threshold:
                continue
            probs = [scale * class_probs[b, p, j].item() for j in range(num_classes)]
            box = boxes[b, p].clamp(0, 1) if clip_first else boxes[b, p]
            dets.append([box.tolist(), [q if q > conf_threshold else 0.0 for q in probs]])
        for k in range(num_classes):
            ordered = sorted(dets, key=lambda det, k=k: -det[1][k])
            for i, det in enumerate(ordered):
                if det[1][k] == 0:
                    continue
                for other in ordered[i + 1 :]:
                    if darknet_iou(det[0], other[0]) > nms_threshold:
                        other[1][k] = 0.0
        rows = [
            [*(min(max(v, 0.0), 1.0) for v in box), prob, float(k)]
            for box, probs in dets
            for k, prob in enumerate(probs)
            if prob > 0
        ]
        rows.sort(key=lambda row: -row[4])  # stable: ties keep (prediction, class) order
        results.append(torch.tensor(rows[:max_detections], dtype=torch.float64).reshape(-1, 6))
    return results


def assert_matches(detections, expected, atol=1e-6):
    assert len(detections) == len(expected)
    for got, want in zip(detections, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("seed", "conf_threshold", "nms_threshold", "max_detections"),
    [(0, 0.005, 0.45, 100), (1, 0.05, 0.3, 100), (2, 0.01, 0.6, 7), (3, 0.2, 0.45, 100)],
)
def test_postprocess_matches_darknets_loop(seed, conf_threshold, nms_threshold, max_detections):
    raw = random_raw(seed)
    detections = postprocess(raw, ANCHORS, conf_threshold, nms_threshold, max_detections)
    expected = reference(raw, ANCHORS, conf_threshold, nms_threshold, max_detections)
    assert_matches(detections, expected)
    assert all(len(d) > 0 and bool((d[1:, 4] <= d[:-1, 4]).all()) for d in detections)
    assert max(len(d) for d in detections) == max_detections or max_detections == 100


def test_nms_runs_on_unclipped_boxes():
    """Boxes reaching past the image: clipping first would change which boxes overlap."""
    raw = random_raw(4, batch=2, wide=1.0)
    detections = postprocess(raw, ANCHORS, 0.01, 0.45, 100)
    boxes, _, _ = decode(raw, ANCHORS)
    assert ((boxes < 0) | (boxes > 1)).any(dim=2).float().mean() > 0.5
    assert_matches(detections, reference(raw, ANCHORS, 0.01, 0.45, 100))
    clip_first = reference(raw, ANCHORS, 0.01, 0.45, 100, clip_first=True)
    assert any(
        d.shape != c.shape or not torch.allclose(d.double(), c)
        for d, c in zip(detections, clip_first, strict=True)
    )
    assert all(bool(((d[:, :4] >= 0) & (d[:, :4] <= 1)).all()) for d in detections)


def test_boxes_far_past_the_image_never_suppress_another_class():
    """Five equal boxes 40 cells wide on a 1x1 grid, in two classes: one kept per class, even at
    a low NMS threshold (boxes reaching below 0 must not overlap another group's)."""
    raw = torch.zeros(1, len(ANCHORS), 5 + 2, 1, 1)
    raw[0, :, 2:4, 0, 0] = torch.log(40 / ANCHORS)
    raw[0, :, 4:6] = torch.tensor([3.0, 1.0])[:, None, None]
    detections = postprocess(raw.reshape(1, -1, 1, 1), ANCHORS, 0.005, 0.05)
    assert_matches(detections, reference(raw.reshape(1, -1, 1, 1), ANCHORS, 0.005, 0.05, 100))
    assert detections[0][:, 5].tolist() == [0.0, 1.0]


def test_ties_keep_the_prediction_order():
    """Quantised raw values give many equal scores; anchor 5 repeats anchor 0, so every anchor-0
    prediction has a twin of equal box and score later in the prediction order. In float64, so
    that scores tie in the reference exactly where they tie here."""
    anchors = torch.cat([ANCHORS, ANCHORS[:1]])
    gen = torch.Generator().manual_seed(5)
    raw = (2 * torch.randn(2, 6, 8, 5, 4, generator=gen, dtype=torch.float64)).round() / 2
    raw[:, 5] = raw[:, 0]
    raw = raw.reshape(2, 6 * 8, 5, 4)
    for max_detections in (9, 100):
        detections = postprocess(raw, anchors, 0.01, 0.45, max_detections)
        assert_matches(detections, reference(raw, anchors, 0.01, 0.45, max_detections), atol=0)
    scores = torch.cat(detections)[:, 4]
    assert len(scores) > len(scores.unique()) + 10  # many ties among the kept
    assert all(len(d) == len(d.unique(dim=0)) for d in detections)  # no twin kept


def test_all_ties_without_suppression_come_in_prediction_then_class_order():
    raw = torch.zeros(1, len(ANCHORS) * 7, 2, 3)  # every score 0.5 / 2, all boxes distinct
    detections = postprocess(raw, ANCHORS, 0.1, nms_threshold=1.0, max_detections=1000)[0]
    boxes, _, _ = decode(raw, ANCHORS)
    expected = boxes[0].clamp(0, 1).repeat_interleave(2, 0)  # [P*C, 4] prediction, then class
    assert detections.shape == (2 * 3 * len(ANCHORS) * 2, 6)
    torch.testing.assert_close(detections[:, :4], expected)
    assert detections[:, 5].tolist() == [0.0, 1.0] * (2 * 3 * len(ANCHORS))
    capped = postprocess(raw, ANCHORS, 0.1, nms_threshold=1.0, max_detections=4)[0]
    torch.testing.assert_close(capped, detections[:4])


def test_an_image_whose_best_candidates_suppress_each_other(monkeypatch):
    """Image 0 holds boxes of one class, 10 times the image, in every cell: its best candidates
    suppress each other, so NMS of them alone keeps too few and a second pass takes all."""
    calls, nms_pass = [], yolo.nms._nms

    def counting_nms(subset, *args):
        calls.append(int(subset.sum()))
        return nms_pass(subset, *args)

    monkeypatch.setattr(yolo.nms, "_nms", counting_nms)
    raw = random_raw(6, batch=2, grid=(8, 8))
    image_0 = raw.view(2, 5, 9, 8, 8)[0]  # [A, 5+C, H, W]
    image_0[:, 2:4] = torch.log(80 / ANCHORS)[:, :, None, None]  # 80 x 80 cells: all overlap
    image_0[:, 4] = 3.0
    image_0[:, 5] = 12.0  # class 0 only
    for max_detections in (3, 20):
        calls.clear()
        detections = postprocess(raw, ANCHORS, 0.005, 0.45, max_detections)
        assert_matches(detections, reference(raw, ANCHORS, 0.005, 0.45, max_detections))
        assert len(calls) == 2 and calls[1] > calls[0]  # the second pass over image 0


@pytest.mark.parametrize(("seed", "shift"), [(10, -1.0), (11, 1.0)])
def test_no_cap_keeps_every_detection_as_darknet(seed, shift):
    """max_detections=None: every candidate kept by NMS, here more than 100 in an image."""
    raw = random_raw(seed, batch=2, grid=(9, 8), num_classes=6, objectness_shift=shift)
    detections = postprocess(raw, ANCHORS, 0.005, 0.45, None)
    assert_matches(detections, reference(raw, ANCHORS, 0.005, 0.45, None))
    assert max(len(d) for d in detections) > 100
    capped = postprocess(raw, ANCHORS, 0.005, 0.45, 100)
    assert all(torch.equal(c, d[:100]) for c, d in zip(capped, detections, strict=True))


@pytest.mark.parametrize("limit", [50, 10**6])
def test_offset_nms_keeps_the_per_group_sets(monkeypatch, limit):
    """The CUDA path (groups moved apart, a few images per call) run on the CPU: the same kept
    candidates as one NMS per group, also when the images are split over several calls."""
    monkeypatch.setattr(yolo.nms, "_CUDA_NMS_CANDIDATES", limit)
    gen = torch.Generator().manual_seed(12)
    image = torch.randint(0, 6, (400,), generator=gen).sort().values
    label = torch.randint(0, 3, (400,), generator=gen)
    corner = torch.rand(400, 2, generator=gen) - 0.2
    boxes = torch.cat([corner, corner + torch.rand(400, 2, generator=gen) * 0.6 + 0.2], 1)
    scores = (torch.rand(400, generator=gen) * 20).round() / 20  # ties
    everything = torch.ones(400, dtype=torch.bool)
    per_group = yolo.nms._nms(everything, boxes, scores, image * 3 + label, image, 0.45)
    shifted = yolo.nms._nms_offset(boxes.double(), scores.double(), image * 3 + label, image, 0.45)
    assert torch.equal(per_group, shifted.sort().values)
    assert 40 < len(per_group) < 360


def test_empty_images_give_empty_tensors():
    raw = random_raw(7)
    raw.view(3, 5, 9, 7, 6)[1, :, 4] = -30.0  # image 1: nothing above the threshold
    detections = postprocess(raw, ANCHORS)
    assert detections[1].shape == (0, 6) and len(detections[0]) and len(detections[2])
    assert_matches(detections, reference(raw, ANCHORS, 0.005, 0.45, 100))
    nothing = postprocess(random_raw(8, objectness_shift=-30.0), ANCHORS)
    assert [tuple(d.shape) for d in nothing] == [(0, 6)] * 3


def test_double_and_half_inputs():
    raw = random_raw(9).double()
    double = postprocess(raw, ANCHORS, 0.05)
    assert double[0].dtype == torch.float64
    assert_matches(double, reference(raw, ANCHORS, 0.05, 0.45, 100), atol=1e-12)
    single = postprocess(raw.float(), ANCHORS, 0.05)
    half = postprocess(raw.half(), ANCHORS, 0.05)
    assert single[0].dtype == torch.float32 and half[0].dtype == torch.float32
    assert abs(half[0].shape[0] - single[0].shape[0]) <= 3


def test_bad_arguments_are_rejected():
    raw = random_raw(6)
    with pytest.raises(ValueError, match="conf_threshold"):
        postprocess(raw, ANCHORS, conf_threshold=1.5)
    with pytest.raises(ValueError, match="nms_threshold"):
        postprocess(raw, ANCHORS, nms_threshold=-0.1)
    with pytest.raises(ValueError, match="max_detections"):
        postprocess(raw, ANCHORS, max_detections=0)
    assert len(postprocess(raw, ANCHORS, max_detections=None)) == raw.shape[0]
    with pytest.raises(ValueError, match="expected"):
        postprocess(raw, ANCHORS[:2])


def test_one_sort_key_orders_as_two_stable_sorts():
    gen = torch.Generator().manual_seed(13)
    group = torch.randint(0, 5000, (20000,), generator=gen)
    score = torch.rand(20000, generator=gen) * (1 - 2**-10) + 2**-10
    score[::3] = score[1::3][: len(score[::3])]  # ties
    score[:50] = torch.nextafter(score[50:100], torch.tensor(1.0))  # one ulp apart
    group[:50] = group[50:100]
    one = yolo.nms._group_then_score(group, score, one_key=True)
    two = yolo.nms._group_then_score(group, score, one_key=False)
    assert yolo.nms._one_key(score, float(score.min()), 5000)
    assert torch.equal(one, two)
