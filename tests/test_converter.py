"""decode, flatten_predictions, assign_targets and match_max_total_iou against plain loops."""

import itertools
import math

import pytest
import torch

from yolo.converter import (
    assign_targets,
    cell_boxes,
    decode,
    flatten_predictions,
    match_max_total_iou,
)

ANCHORS = torch.tensor([[1.3, 1.7], [3.25, 3.9], [5.2, 7.8]])  # grid cells


def test_decode_matches_a_loop_over_cells_on_a_non_square_grid():
    gen = torch.Generator().manual_seed(0)
    num_anchors, num_classes, grid_h, grid_w = 3, 4, 3, 5
    raw = torch.randn(2, num_anchors * (5 + num_classes), grid_h, grid_w, generator=gen)
    boxes, objectness, class_probs = decode(raw, ANCHORS)
    assert boxes.shape == (2, grid_h * grid_w * num_anchors, 4)
    assert objectness.shape == (2, grid_h * grid_w * num_anchors)
    assert class_probs.shape == (2, grid_h * grid_w * num_anchors, num_classes)
    per_anchor = 5 + num_classes
    for b, row, col, a in itertools.product(
        range(2), range(grid_h), range(grid_w), range(num_anchors)
    ):
        index = (row * grid_w + col) * num_anchors + a
        tx, ty, tw, th, to = (raw[b, a * per_anchor + k, row, col].item() for k in range(5))
        cx = (col + 1 / (1 + math.exp(-tx))) / grid_w
        cy = (row + 1 / (1 + math.exp(-ty))) / grid_h
        w = math.exp(tw) * ANCHORS[a, 0].item() / grid_w  # darknet's get_region_box
        h = math.exp(th) * ANCHORS[a, 1].item() / grid_h
        expected = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        torch.testing.assert_close(boxes[b, index], expected, rtol=1e-5, atol=1e-6)
        assert objectness[b, index].item() == pytest.approx(1 / (1 + math.exp(-to)), rel=1e-5)
        logits = raw[b, a * per_anchor + 5 : (a + 1) * per_anchor, row, col]
        torch.testing.assert_close(class_probs[b, index], logits.softmax(0))


def test_same_raw_values_give_the_same_pixel_size_at_every_grid():
    """An anchor is fixed in pixels (32 per cell): the same (tw, th) decodes to the same box in
    pixels at 416 (13x13) and 608 (19x19), exp(t) * anchor * 32."""
    gen = torch.Generator().manual_seed(1)
    per_anchor = torch.randn(len(ANCHORS), 5 + 4, 1, 1, generator=gen)  # one value per channel
    expected = per_anchor[:, 2:4, 0, 0].exp() * ANCHORS * 32  # [A, 2] pixels
    for grid in (13, 19):
        raw = per_anchor.expand(-1, -1, grid, grid).reshape(1, -1, grid, grid)  # [1, A*9, S, S]
        boxes, _, _ = decode(raw, ANCHORS)  # [1, S*S*A, 4]
        size_px = (boxes[0, :, 2:] - boxes[0, :, :2]) * 32 * grid  # [S*S*A, 2]
        anchor = torch.arange(grid * grid * len(ANCHORS)) % len(ANCHORS)  # [S*S*A]
        torch.testing.assert_close(size_px, expected[anchor])


def test_cell_boxes_worked_example():
    # cell (6, 6) of 13x13, raw 0: centre 6.5/13 = 0.5, anchor 1 (3.25 x 3.9 cells) = 104 x 124.8 px
    box_px = cell_boxes(torch.zeros(4), 6, 6, ANCHORS[1], 13, 13) * 416
    torch.testing.assert_close(box_px, torch.tensor([156.0, 145.6, 260.0, 270.4]))


def test_flatten_rejects_a_channel_count_that_does_not_fit_the_anchors():
    with pytest.raises(ValueError, match="num_anchors"):
        flatten_predictions(torch.zeros(1, 26, 2, 2), 3)


def test_assignment_cell_and_anchor_follow_darknet():
    # grid 4 rows x 3 columns; in cells (x3, x4) these are 0.2x0.2, 0.2x0.2, 0.5x0.5 of the image
    anchors = torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.5, 2.0]])  # a tie: first anchor wins
    targets = torch.tensor(
        [
            [[0, 1.0, 1.0, 0.2, 0.2], [-1, 0, 0, 0, 0], [1, 0.0, 0.49, 0.45, 0.55]],
            [[-1, 0, 0, 0, 0], [2, 0.5, 0.75, 0.01, 0.01], [-1, 0, 0, 0, 0]],
        ]
    )
    for mode in ("darknet", "global"):
        match = assign_targets(targets, anchors, 4, 3, mode)
        assert match.batch_index.tolist() == [0, 0, 1]
        assert match.target_index.tolist() == [0, 2, 1]
        assert match.col.tolist() == [2, 0, 1]
        assert match.row.tolist() == [3, 1, 3]
        assert match.anchor.tolist() == [0, 2, 0]
        assert match.pred_index.tolist() == [(3 * 3 + 2) * 3, (1 * 3) * 3 + 2, (3 * 3 + 1) * 3]
        assert match.num_dropped.item() == 0


def test_assignment_without_ground_truth():
    match = assign_targets(torch.full((2, 3, 5), -1.0), ANCHORS, 13, 13, "global")
    assert match.pred_index.numel() == 0 and match.num_dropped.item() == 0
    match = assign_targets(torch.zeros(2, 0, 5), ANCHORS, 13, 13, "darknet")
    assert match.pred_index.numel() == 0


def brute_force(weights: torch.Tensor) -> float:
    """Best total over all assignments of distinct anchors (or none) to the rows >= 0."""
    rows = [k for k in range(weights.shape[0]) if weights[k].min() >= 0]
    options = list(range(weights.shape[1])) + [-1] * len(rows)
    best = 0.0
    for choice in set(itertools.permutations(options, len(rows))):
        total = sum(weights[k, a].item() for k, a in zip(rows, choice, strict=True) if a >= 0)
        best = max(best, total)
    return best


@pytest.mark.parametrize("num_rows", [1, 2, 4, 6])
def test_matching_is_exact_and_distinct(num_rows):
    gen = torch.Generator().manual_seed(num_rows)
    weights = torch.rand(12, num_rows, 4, generator=gen, dtype=torch.float64)
    weights[::3, -1] = -1.0  # padding rows
    matched = match_max_total_iou(weights)
    for m in range(weights.shape[0]):
        chosen = [a for a in matched[m].tolist() if a >= 0]
        assert len(chosen) == len(set(chosen))
        assert all(matched[m, k] < 0 for k in range(num_rows) if weights[m, k].min() < 0)
        total = sum(weights[m, k, a].item() for k, a in enumerate(matched[m].tolist()) if a >= 0)
        assert total == pytest.approx(brute_force(weights[m]), rel=1e-12)


def bias_match(w: float, h: float, anchors: list, grid_w: int, grid_h: int) -> int:
    """darknet's choice: the first anchor of best IoU of (anchor_w / W, anchor_h / H) and the
    normalised (w, h), both centred (region_layer.c, bias_match with DOABS)."""
    best_iou, best_n = 0.0, 0
    for n, (anchor_w, anchor_h) in enumerate(anchors):
        pred_w, pred_h = anchor_w / grid_w, anchor_h / grid_h
        inter = min(w, pred_w) * min(h, pred_h)
        iou = inter / (w * h + pred_w * pred_h - inter)
        if iou > best_iou:
            best_iou, best_n = iou, n
    return best_n


def test_global_assignment_only_changes_cells_with_competition():
    gen = torch.Generator().manual_seed(3)
    targets = torch.cat(
        [
            torch.randint(0, 20, (4, 30, 1), generator=gen).float(),
            torch.rand(4, 30, 2, generator=gen),
            0.02 + 0.6 * torch.rand(4, 30, 2, generator=gen),
        ],
        dim=2,
    )
    targets[1, 20:, 0] = -1
    match = assign_targets(targets, ANCHORS, 5, 5, "global")
    slots = list(zip(match.batch_index.tolist(), match.pred_index.tolist(), strict=True))
    assert len(set(slots)) == len(slots)
    anchor_of = {
        (b, g): a
        for b, g, a in zip(
            match.batch_index.tolist(),
            match.target_index.tolist(),
            match.anchor.tolist(),
            strict=True,
        )
    }
    cells: dict[tuple, list] = {}
    for b, g in (targets[..., 0] >= 0).nonzero().tolist():
        _, cx, cy, w, h = targets[b, g].tolist()
        best = bias_match(w, h, ANCHORS.tolist(), 5, 5)
        cells.setdefault((b, min(int(cy * 5), 4), min(int(cx * 5), 4)), []).append((g, best))
    expected_dropped = 0
    num_contested = 0
    for (b, _, _), members in cells.items():
        best_anchors = [best for _, best in members]
        if len(set(best_anchors)) == len(best_anchors):
            assert [anchor_of[b, g] for g, _ in members] == best_anchors
        else:
            num_contested += 1
            kept = [anchor_of[b, g] for g, _ in members if (b, g) in anchor_of]
            assert len(kept) == min(len(members), len(ANCHORS))
        expected_dropped += max(len(members) - len(ANCHORS), 0)
    assert num_contested > 3 and expected_dropped > 0
    assert match.num_dropped.item() == expected_dropped
