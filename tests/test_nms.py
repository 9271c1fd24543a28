"""postprocess and grouped_nms against per-image, per-class torchvision NMS."""

import pytest
import torch
from torchvision.ops import batched_nms, nms

import yolo.nms
from yolo.converter import decode
from yolo.nms import grouped_nms, postprocess

ANCHORS = torch.tensor([[0.56, 0.6], [1.4, 1.5], [2.45, 3.0], [4.2, 2.1], [5.6, 4.5]])  # grid cells


def random_raw(seed: int, batch=3, grid=(7, 6), num_classes=6, objectness_shift=-1.0):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, len(ANCHORS), 5 + num_classes, *grid, generator=gen)
    raw[:, :, 4] += objectness_shift
    raw[:, :, 5:] *= 2.0
    return raw.reshape(batch, -1, *grid)


def reference(raw, anchors, conf_threshold, nms_threshold, max_detections):
    """Plain loops: per image, per class, torchvision's nms; then the top scores. Also returns
    how many candidates the NMS suppressed."""
    boxes, objectness, class_probs = decode(raw, anchors)
    results, num_suppressed = [], 0
    for b in range(raw.shape[0]):
        rows = []
        for c in range(class_probs.shape[2]):
            scores = objectness[b] * class_probs[b, :, c]
            keep = scores > conf_threshold
            class_boxes, class_scores = boxes[b, keep].clamp(0, 1), scores[keep]
            kept = nms(class_boxes, class_scores, nms_threshold).tolist()
            num_suppressed += class_scores.numel() - len(kept)
            for k in kept:
                rows.append([*class_boxes[k].tolist(), class_scores[k].item(), float(c)])
        rows.sort(key=lambda row: -row[4])
        results.append(torch.tensor(rows[:max_detections]).reshape(-1, 6))
    return results, num_suppressed


def by_score(detections: torch.Tensor) -> torch.Tensor:
    """Rows ordered by score, then class and box, so that equal scores compare too."""
    keys = detections[:, [3, 2, 1, 0, 5]].tolist()
    order = sorted(range(len(keys)), key=lambda i: (-detections[i, 4].item(), keys[i]))
    return detections[order]


@pytest.mark.parametrize(
    ("seed", "conf_threshold", "nms_threshold", "max_detections"),
    [(0, 0.005, 0.45, 100), (1, 0.05, 0.3, 100), (2, 0.01, 0.6, 7), (3, 0.2, 0.45, 100)],
)
def test_postprocess_matches_per_class_reference(
    seed, conf_threshold, nms_threshold, max_detections
):
    raw = random_raw(seed)
    detections = postprocess(raw, ANCHORS, conf_threshold, nms_threshold, max_detections)
    expected, num_suppressed = reference(
        raw, ANCHORS, conf_threshold, nms_threshold, max_detections
    )
    assert num_suppressed > 0
    assert len(detections) == raw.shape[0]
    for got, want in zip(detections, expected, strict=True):
        assert got.shape == want.shape and got.shape[0] > 0
        assert bool((got[1:, 4] <= got[:-1, 4]).all())
        torch.testing.assert_close(by_score(got), by_score(want))


def clustered_boxes(seed: int, count: int, num_groups: int, signed_scores: bool = False):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(count // 8, 2, generator=gen).repeat_interleave(8, 0)
    centres = centres + 0.03 * torch.randn(count, 2, generator=gen)
    sizes = 0.05 + 0.2 * torch.rand(count, 2, generator=gen)
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    scores = torch.randn(count, generator=gen)
    if not signed_scores:
        scores = scores.sigmoid()
    groups = torch.randint(0, num_groups, (count,), generator=gen)
    return boxes, scores, groups


@pytest.mark.parametrize("pair_budget", [yolo.nms.MAX_NMS_PAIRS, 0])
@pytest.mark.parametrize(("count", "num_groups"), [(400, 3), (2000, 40), (8, 1)])
def test_grouped_nms_equals_batched_nms(monkeypatch, pair_budget, count, num_groups):
    monkeypatch.setattr(yolo.nms, "MAX_NMS_PAIRS", pair_budget)
    boxes, scores, groups = clustered_boxes(count, count, num_groups)
    kept = grouped_nms(boxes, scores, groups, 0.45)
    expected = batched_nms(boxes, scores, groups, 0.45).sort().values
    assert torch.equal(kept, expected)
    assert kept.numel() < count


@pytest.mark.parametrize("max_detections", [3, 5, 40])
def test_nms_of_the_best_candidates_first_changes_nothing(max_detections):
    """Image 0 is one tight cluster of 60 boxes plus a few lone ones: its best candidates keep
    too few, so it takes the full NMS; image 1 has many lone boxes and is cut short."""
    gen = torch.Generator().manual_seed(11)
    cluster = torch.tensor([0.4, 0.4, 0.6, 0.6]) + 0.002 * torch.rand(60, 4, generator=gen)
    corners = torch.rand(40, 2, generator=gen) * 0.9
    lone = torch.cat([corners, corners + 0.02], dim=1)  # small, mostly apart
    boxes = torch.cat([cluster, lone[:10], lone])  # [110, 4]
    scores = torch.cat([0.5 + 0.5 * torch.rand(60, generator=gen), torch.rand(50, generator=gen)])
    image = torch.tensor([0] * 70 + [1] * 40)
    groups = image * 2  # one class
    expected = yolo.nms._top_per_image(
        grouped_nms(boxes, scores, groups, 0.45), scores, image, 2, max_detections
    )
    kept = yolo.nms._nms_best_first(
        boxes, scores, image, groups, 0.45, batch_size=2, max_detections=max_detections
    )
    assert torch.equal(yolo.nms._top_per_image(kept, scores, image, 2, max_detections), expected)
    assert kept.numel() < grouped_nms(boxes, scores, groups, 0.45).numel() or max_detections == 40


def test_grouped_nms_with_negative_scores():
    boxes, scores, groups = clustered_boxes(9, 600, 5, signed_scores=True)
    kept = grouped_nms(boxes, scores, groups, 0.5)
    assert torch.equal(kept, batched_nms(boxes, scores, groups, 0.5).sort().values)


def test_grouped_nms_of_nothing():
    kept = grouped_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert kept.numel() == 0


def test_equal_scores_keep_the_prediction_order():
    raw = torch.zeros(1, len(ANCHORS) * 7, 2, 3)  # every score 0.5 / 2, all boxes distinct
    detections = postprocess(raw, ANCHORS, 0.1, nms_threshold=1.0, max_detections=1000)[0]
    boxes, _, _ = decode(raw, ANCHORS)
    expected = boxes[0].clamp(0, 1).repeat_interleave(2, 0)  # [P*C, 4] prediction, then class
    assert detections.shape == (2 * 3 * len(ANCHORS) * 2, 6)
    torch.testing.assert_close(detections[:, :4], expected)
    assert detections[:, 5].tolist() == [0.0, 1.0] * (2 * 3 * len(ANCHORS))
    capped = postprocess(raw, ANCHORS, 0.1, nms_threshold=1.0, max_detections=4)[0]
    torch.testing.assert_close(capped, detections[:4])


def test_nothing_above_the_threshold_gives_empty_tensors():
    raw = random_raw(4, objectness_shift=-30.0)
    detections = postprocess(raw, ANCHORS)
    assert [tuple(d.shape) for d in detections] == [(0, 6)] * 3


def test_half_and_double_inputs():
    raw = random_raw(5)
    single = postprocess(raw, ANCHORS, 0.05)
    double = postprocess(raw.double(), ANCHORS, 0.05)
    half = postprocess(raw.half(), ANCHORS, 0.05)
    assert double[0].dtype == torch.float64 and half[0].dtype == torch.float32
    torch.testing.assert_close(double[0].float(), single[0])
    assert abs(half[0].shape[0] - single[0].shape[0]) <= 3


def test_bad_arguments_are_rejected():
    raw = random_raw(6)
    with pytest.raises(ValueError, match="conf_threshold"):
        postprocess(raw, ANCHORS, conf_threshold=1.5)
    with pytest.raises(ValueError, match="nms_threshold"):
        postprocess(raw, ANCHORS, nms_threshold=-0.1)
    with pytest.raises(ValueError, match="max_detections"):
        postprocess(raw, ANCHORS, max_detections=0)
    with pytest.raises(ValueError, match="expected"):
        postprocess(raw, ANCHORS[:3])
