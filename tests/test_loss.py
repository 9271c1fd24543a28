"""YOLOv2Loss against a plain-loop transcription of darknet's forward_region_layer.

The reference walks images, cells, anchors and ground truths in darknet's order, records which
target every output entry ends with (later writes overwrite earlier ones, as darknet's delta
array does), then forms darknet's delta (x, y and objectness through the logistic gradient, as
backward_region_layer_gpu applies it) and the loss terms. Gradients must equal ``-delta / N``.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from yolo.converter import assign_targets
from yolo.loss import YOLOv2Loss

VOC_ANCHORS = torch.tensor(  # darknet's yolov2-voc anchors=, in grid cells
    [
        [1.3221, 1.73145],
        [3.19275, 4.00944],
        [5.05587, 8.09892],
        [9.47112, 4.84053],
        [11.2364, 10.0071],
    ],
    dtype=torch.float64,
)
SCALES = dict(object_scale=5.0, noobject_scale=1.0, class_scale=1.0, coord_scale=1.0)


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def centre_iou(a: tuple, b: tuple) -> float:
    """Darknet's box_iou on (x, y, w, h) centre boxes."""
    overlap_w = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    overlap_h = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    inter = max(overlap_w, 0.0) * max(overlap_h, 0.0) if overlap_w > 0 and overlap_h > 0 else 0.0
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def best_shape_anchor(w: float, h: float, anchors: np.ndarray, grid_w: int, grid_h: int) -> int:
    """bias_match with DOABS: pred.w = biases[2n] / l.w, pred.h = biases[2n+1] / l.h."""
    best_iou, best_n = 0.0, 0
    for n, (anchor_w, anchor_h) in enumerate(anchors):
        iou = centre_iou((0, 0, anchor_w / grid_w, anchor_h / grid_h), (0, 0, w, h))
        if iou > best_iou:
            best_iou, best_n = iou, n
    return best_n


def reference_loss(raw, targets, anchors, *, seen, rescore=True, override=None):
    """Darknet's region layer by loops. ``override`` maps (image, target row) to the anchor to
    use instead of darknet's choice, or None to skip that ground truth. Returns (delta
    ``[N, A*(5+C), H, W]`` float64, terms dict divided by N)."""
    raw = raw.detach().double().numpy()
    targets = targets.double().numpy()
    anchors = anchors.double().numpy()
    batch, channels, grid_h, grid_w = raw.shape
    num_anchors = len(anchors)
    out = raw.reshape(batch, num_anchors, channels // num_anchors, grid_h, grid_w)
    delta = np.zeros_like(out)
    terms = dict.fromkeys(("coord", "obj", "noobj", "cls", "prior"), 0.0)
    for b in range(batch):
        truths = [(g, row) for g, row in enumerate(targets[b]) if row[0] >= 0]
        box_role, obj_role, cls_role = {}, {}, {}
        for j, i, n in itertools.product(range(grid_h), range(grid_w), range(num_anchors)):
            pred = predicted_box(out[b, n, :, j, i], anchors[n], i, j, grid_w, grid_h)
            best_iou = 0.0
            for _, truth in truths:
                best_iou = max(best_iou, centre_iou(pred, tuple(truth[1:5])))
            obj_role[j, i, n] = None if best_iou > 0.6 else ("noobj",)
            if seen < 12800:
                box_role[j, i, n] = ("prior", 0.5, 0.5, 0.0, 0.0, 0.01)
        for g, truth in truths:
            cx, cy, w, h = truth[1:5]
            i, j = min(int(cx * grid_w), grid_w - 1), min(int(cy * grid_h), grid_h - 1)
            size_w, size_h = max(w, 1e-6), max(h, 1e-6)
            n = best_shape_anchor(size_w, size_h, anchors, grid_w, grid_h)
            if override is not None:
                n = override.get((b, g))
                if n is None:
                    continue
            pred = predicted_box(out[b, n, :, j, i], anchors[n], i, j, grid_w, grid_h)
            iou = centre_iou(pred, (cx, cy, w, h))
            box_role[j, i, n] = (
                "coord",
                cx * grid_w - i,
                cy * grid_h - j,
                math.log(size_w * grid_w / anchors[n][0]),  # DOABS: log(truth.w*w / biases[2n])
                math.log(size_h * grid_h / anchors[n][1]),
                1.0 * (2 - w * h),
            )
            obj_role[j, i, n] = ("obj", iou if rescore else 1.0)
            cls_role[j, i, n] = int(truth[0])
        apply_roles(out[b], delta[b], terms, box_role, obj_role, cls_role)
    return delta.reshape(raw.shape), {k: v / batch for k, v in terms.items()}


def predicted_box(entries, anchor, i, j, grid_w, grid_h):
    """get_region_box with DOABS: exp(t) * bias / (w, h)."""
    return (
        (i + sigmoid(entries[0])) / grid_w,
        (j + sigmoid(entries[1])) / grid_h,
        math.exp(entries[2]) * anchor[0] / grid_w,
        math.exp(entries[3]) * anchor[1] / grid_h,
    )


def apply_roles(out, delta, terms, box_role, obj_role, cls_role):
    """Turn the final role of every entry of one image into delta and term values."""
    for (j, i, n), (kind, tx, ty, tw, th, scale) in box_role.items():
        entries = out[n, :, j, i]
        for k, target in ((0, tx), (1, ty)):
            s = sigmoid(entries[k])
            delta[n, k, j, i] = scale * (target - s) * s * (1 - s)
            terms[kind] += 0.5 * scale * (s - target) ** 2
        for k, target in ((2, tw), (3, th)):
            delta[n, k, j, i] = scale * (target - entries[k])
            terms[kind] += 0.5 * scale * (entries[k] - target) ** 2
    for (j, i, n), role in obj_role.items():
        if role is None:
            continue
        s = sigmoid(out[n, 4, j, i])
        scale, target = (1.0, 0.0) if role[0] == "noobj" else (5.0, role[1])
        delta[n, 4, j, i] = scale * (target - s) * s * (1 - s)
        terms[role[0]] += 0.5 * scale * (s - target) ** 2
    for (j, i, n), cls in cls_role.items():
        logits = out[n, 5:, j, i]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        delta[n, 5:, j, i] = np.eye(len(logits))[cls] - probs
        terms["cls"] += -math.log(probs[cls])


def anchor_keys(targets: torch.Tensor, anchors: torch.Tensor, grid_h: int, grid_w: int):
    """(image, cell, best anchor) of every valid row, in order."""
    keys = []
    for b, g in (targets[..., 0] >= 0).nonzero().tolist():
        _, cx, cy, w, h = targets[b, g].tolist()
        cell = (min(int(cy * grid_h), grid_h - 1), min(int(cx * grid_w), grid_w - 1))
        keys.append((b, cell, best_shape_anchor(w, h, anchors.numpy(), grid_w, grid_h)))
    return keys


def random_case(seed, *, batch=3, grid=(4, 5), num_classes=4, max_gt=5, distinct=True):
    """Random raw head and targets; some predictions are planted on ground truths so that the
    ignore threshold matters. ``distinct``: resample until no two ground truths compete."""
    gen = torch.Generator().manual_seed(seed)
    grid_h, grid_w = grid
    num_anchors = len(VOC_ANCHORS)
    targets = torch.full((batch, max_gt + 1, 5), -1.0, dtype=torch.float64)
    for b in range(batch):
        count = int(torch.randint(0, max_gt + 1, (1,), generator=gen)) if b else max_gt
        for g in range(count):
            while True:
                row = torch.cat(
                    [
                        torch.randint(0, num_classes, (1,), generator=gen).double(),
                        torch.rand(2, generator=gen, dtype=torch.float64),
                        0.02 + 0.8 * torch.rand(2, generator=gen, dtype=torch.float64),
                    ]
                )
                targets[b, g] = row
                keys = anchor_keys(targets[b : b + 1], VOC_ANCHORS, grid_h, grid_w)
                if not distinct or len(set(keys)) == len(keys):
                    break
    raw = torch.randn(batch, num_anchors, 5 + num_classes, grid_h, grid_w, generator=gen)
    raw = raw.double()
    plant(raw, targets, gen)
    return raw.reshape(batch, -1, grid_h, grid_w).requires_grad_(), targets


def plant(raw, targets, gen):
    """Set a random anchor of each ground truth's cell to predict it, with some noise."""
    _, num_anchors, _, grid_h, grid_w = raw.shape
    for b, g in (targets[..., 0] >= 0).nonzero().tolist():
        _, cx, cy, w, h = targets[b, g].tolist()
        i, j = min(int(cx * grid_w), grid_w - 1), min(int(cy * grid_h), grid_h - 1)
        n = int(torch.randint(0, num_anchors, (1,), generator=gen))
        noise = 0.05 * torch.randn(4, generator=gen, dtype=torch.float64)
        offset_x = min(max(cx * grid_w - i, 0.01), 0.99)
        offset_y = min(max(cy * grid_h - j, 0.01), 0.99)
        raw[b, n, 0, j, i] = math.log(offset_x / (1 - offset_x)) + noise[0]
        raw[b, n, 1, j, i] = math.log(offset_y / (1 - offset_y)) + noise[1]
        raw[b, n, 2, j, i] = math.log(w * grid_w / VOC_ANCHORS[n, 0]) + noise[2]
        raw[b, n, 3, j, i] = math.log(h * grid_h / VOC_ANCHORS[n, 1]) + noise[3]


def loss_and_grad(raw, targets, *, seen=0, assignment="global", **kwargs):
    num_classes = raw.shape[1] // len(VOC_ANCHORS) - 5
    criterion = YOLOv2Loss(VOC_ANCHORS, num_classes, assignment=assignment, **kwargs)
    raw = raw.detach().clone().requires_grad_()
    terms = criterion(raw, targets, seen=seen)
    terms["total"].backward()
    return terms, raw.grad


def assert_matches_reference(raw, targets, *, seen=0, assignment="global", override=None):
    terms, grad = loss_and_grad(raw, targets, seen=seen, assignment=assignment)
    delta, ref_terms = reference_loss(raw, targets, VOC_ANCHORS, seen=seen, override=override)
    torch.testing.assert_close(grad, torch.from_numpy(-delta / raw.shape[0]), rtol=1e-9, atol=1e-12)
    for name, value in ref_terms.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert terms["total"].item() == pytest.approx(sum(ref_terms.values()), rel=1e-9)
    return terms


@pytest.mark.parametrize("assignment", ["darknet", "global"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_equals_darknet_delta_without_competition(assignment, seed):
    raw, targets = random_case(seed)
    terms = assert_matches_reference(raw, targets, assignment=assignment)
    assert terms["num_dropped"].item() == 0
    assert all(terms[name].item() > 0 for name in ("coord", "obj", "noobj", "cls", "prior"))


def test_ignore_threshold_is_exercised():
    """The planted predictions must reach IoU > 0.6, or the no-object mask goes untested."""
    raw, targets = random_case(0)
    delta, _ = reference_loss(raw, targets, VOC_ANCHORS, seen=0)
    objectness_delta = delta.reshape(3, 5, 9, 4, 5)[:, :, 4]
    assert (objectness_delta == 0).sum() >= 3


def test_gradient_at_13x13_with_voc_classes():
    raw, targets = random_case(7, batch=2, grid=(13, 13), num_classes=20, max_gt=4)
    assert_matches_reference(raw, targets, assignment="global")


@pytest.mark.parametrize("assignment", ["darknet", "global"])
def test_prior_term_stops_at_prior_seen(assignment):
    raw, targets = random_case(3)
    terms = assert_matches_reference(raw, targets, seen=12800, assignment=assignment)
    assert terms["prior"].item() == 0.0
    assert loss_and_grad(raw, targets, seen=12799)[0]["prior"].item() > 0


def test_rescore_off_targets_one():
    raw, targets = random_case(4)
    terms, _ = loss_and_grad(raw, targets, rescore=False)
    _, ref_terms = reference_loss(raw, targets, VOC_ANCHORS, seen=0, rescore=False)
    assert terms["obj"].item() == pytest.approx(ref_terms["obj"], rel=1e-9)


def competing_case(seed):
    """Image 0 has three near-identical boxes in one cell and one box elsewhere; image 1 two
    identical boxes (same cell, same anchor)."""
    raw, targets = random_case(seed, batch=2, max_gt=4, distinct=False)
    targets[:] = -1
    targets[0, 0] = torch.tensor([1, 0.31, 0.40, 0.30, 0.35])
    targets[0, 1] = torch.tensor([2, 0.32, 0.41, 0.31, 0.34])
    targets[0, 2] = torch.tensor([3, 0.33, 0.42, 0.29, 0.36])
    targets[0, 3] = torch.tensor([0, 0.90, 0.90, 0.10, 0.10])
    targets[1, 1] = torch.tensor([0, 0.55, 0.55, 0.50, 0.20])
    targets[1, 2] = torch.tensor([2, 0.55, 0.55, 0.50, 0.20])
    return raw, targets


def test_darknet_mode_last_writer_wins():
    raw, targets = competing_case(5)
    terms = assert_matches_reference(raw, targets, assignment="darknet")
    assert terms["num_dropped"].item() == 3
    match = assign_targets(targets, VOC_ANCHORS, 4, 5, "darknet")
    assert sorted(zip(match.batch_index.tolist(), match.target_index.tolist(), strict=True)) == [
        (0, 2),
        (0, 3),
        (1, 2),
    ]


def test_global_mode_gives_every_competitor_its_own_predictor():
    raw, targets = competing_case(6)
    match = assign_targets(targets, VOC_ANCHORS, 4, 5, "global")
    assert match.num_dropped.item() == 0
    assert match.target_index.numel() == 6
    slots = set(zip(match.batch_index.tolist(), match.pred_index.tolist(), strict=True))
    assert len(slots) == 6
    override = {
        (b, g): a
        for b, g, a in zip(
            match.batch_index.tolist(),
            match.target_index.tolist(),
            match.anchor.tolist(),
            strict=True,
        )
    }
    terms = assert_matches_reference(raw, targets, assignment="global", override=override)
    darknet_terms, _ = loss_and_grad(raw, targets, assignment="darknet")
    assert terms["coord"].item() != pytest.approx(darknet_terms["coord"].item())
    for b, cell_rows in ((0, [0, 1, 2]), (1, [1, 2])):
        chosen = [override[b, g] for g in cell_rows]
        assert total_shape_iou(targets[b, cell_rows], chosen) == pytest.approx(
            brute_force_best(targets[b, cell_rows]), rel=1e-12
        )


def total_shape_iou(rows: torch.Tensor, anchors_chosen: list[int], grid=(4, 5)) -> float:
    anchors_frac = VOC_ANCHORS / torch.tensor([grid[1], grid[0]])  # [A, 2] of the image
    return sum(
        centre_iou((0, 0, *row[3:5].tolist()), (0, 0, *anchors_frac[a].tolist()))
        for row, a in zip(rows, anchors_chosen, strict=True)
        if a >= 0
    )


def brute_force_best(rows: torch.Tensor) -> float:
    """Best total shape IoU over all ways to give the rows distinct anchors (or none)."""
    count, num_anchors = len(rows), len(VOC_ANCHORS)
    options = [*range(num_anchors)] + [-1] * count
    best = 0.0
    for choice in itertools.permutations(options, count):
        if len({a for a in choice if a >= 0}) == sum(a >= 0 for a in choice):
            best = max(best, total_shape_iou(rows, list(choice)))
    return best


def test_global_mode_drops_the_excess_of_a_full_cell():
    gen = torch.Generator().manual_seed(8)
    targets = torch.full((1, 8, 5), -1.0, dtype=torch.float64)
    targets[0, :7, 0] = 1
    targets[0, :7, 1:3] = 0.5 + 0.05 * torch.rand(7, 2, generator=gen, dtype=torch.float64)
    targets[0, :7, 3:5] = 0.05 + 0.9 * torch.rand(7, 2, generator=gen, dtype=torch.float64)
    match = assign_targets(targets, VOC_ANCHORS, 4, 5, "global")
    assert match.num_dropped.item() == 2
    assert sorted(match.anchor.tolist()) == [0, 1, 2, 3, 4]
    chosen = dict(zip(match.target_index.tolist(), match.anchor.tolist(), strict=True))
    total = total_shape_iou(targets[0, :7], [chosen.get(g, -1) for g in range(7)])
    best = max(
        total_shape_iou(targets[0, list(rows)], list(range(5)))
        for rows in itertools.permutations(range(7), 5)
    )
    assert total == pytest.approx(best, rel=1e-12)
    raw = torch.randn(1, 5 * 9, 4, 5, dtype=torch.float64)
    terms, _ = loss_and_grad(raw, targets)
    assert terms["num_dropped"].item() == 2


@pytest.mark.parametrize("assignment", ["darknet", "global"])
def test_edge_cases_match_reference(assignment):
    """No ground truth, all-padding images, padding between rows, centres at exactly 1.0 and
    0.0, tiny and zero-size boxes."""
    raw, targets = random_case(9, batch=4, max_gt=4)
    targets[1] = -1
    targets[2, 0] = torch.tensor([1, 1.0, 1.0, 0.3, 0.2])
    targets[2, 1] = -1
    targets[2, 2] = torch.tensor([2, 0.0, 0.5, 1e-9, 0.2])
    targets[2, 3] = torch.tensor([3, 0.5, 0.02, 0.01, 0.0])
    targets[3] = -1
    targets[3, 4] = torch.tensor([0, 0.7, 0.7, 1.0, 1.0])
    terms = assert_matches_reference(raw, targets, assignment=assignment)
    assert terms["num_dropped"].item() == 0
    empty = torch.zeros(2, 0, 5, dtype=torch.float64)
    assert_matches_reference(raw[:2].detach(), empty, assignment=assignment)


def test_batch_normalisation_is_a_mean_over_images():
    raw, targets = random_case(10)
    together, _ = loss_and_grad(raw, targets)
    alone = [loss_and_grad(raw[b : b + 1], targets[b : b + 1])[0]["total"] for b in range(3)]
    assert together["total"].item() == pytest.approx(sum(alone).item() / 3, rel=1e-12)


@pytest.mark.parametrize(
    ("where", "term"),
    [((0, 0, 2, 1, 1), "noobj"), ("class", "cls"), ("coord", "coord")],
)
def test_non_finite_output_names_the_term(where, term):
    raw, targets = random_case(11)
    raw = raw.detach().clone()
    match = assign_targets(targets, VOC_ANCHORS, 4, 5, "global")
    b, pred = match.batch_index[0].item(), match.pred_index[0].item()
    cell, anchor = divmod(pred, 5)
    j, i = divmod(cell, 5)
    view = raw.view(3, 5, 9, 4, 5)
    if where == "class":
        view[b, anchor, 6, j, i] = float("nan")
    elif where == "coord":
        view[b, anchor, 2, j, i] = float("inf")
    else:
        view[2, 0, 4, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=f"{term}=") as error:
        loss_and_grad(raw, targets, seen=20000)
    assert "non-finite" in str(error.value)


def test_half_precision_output_is_computed_in_float32():
    raw, targets = random_case(12)
    criterion = YOLOv2Loss(VOC_ANCHORS, 4)
    half = criterion(raw.detach().half(), targets.half(), seen=0)
    full = criterion(raw.detach().half().float(), targets.float(), seen=0)
    assert half["total"].dtype == torch.float32
    assert half["total"].item() == pytest.approx(full["total"].item(), rel=1e-3)


def test_bad_inputs_are_rejected_clearly():
    raw, targets = random_case(13)
    criterion = YOLOv2Loss(VOC_ANCHORS, 4)
    with pytest.raises(ValueError, match="expected"):
        criterion(raw[:, :-1], targets, seen=0)
    with pytest.raises(ValueError, match="class 7"):
        criterion(raw, torch.tensor([[[7.0, 0.5, 0.5, 0.1, 0.1]]] * 3), seen=0)
    with pytest.raises(ValueError, match="assignment"):
        YOLOv2Loss(VOC_ANCHORS, 4, assignment="hungarian")
    with pytest.raises(ValueError, match="anchors"):
        YOLOv2Loss(torch.ones(5, 3), 4)


@pytest.mark.parametrize("size_px", [(40.0, 90.0), (150.0, 120.0), (330.0, 250.0)])
def test_an_objects_anchor_and_size_target_do_not_depend_on_the_input_size(size_px):
    """An object of w x h pixels gets the same anchor and the same (tw, th) target at 320 and
    608, log(w / 32 / anchor_w) (DOABS): read from the coord gradient at raw 0, where
    d coord / d tw = -coord_scale * (2 - w*h) * target."""
    found = []
    for img_size in (320, 608):
        grid = img_size // 32
        w, h = size_px[0] / img_size, size_px[1] / img_size
        targets = torch.tensor([[[3, 0.43, 0.57, w, h]]], dtype=torch.float64)
        match = assign_targets(targets, VOC_ANCHORS, grid, grid, "darknet")
        raw = torch.zeros(1, 5 * 9, grid, grid, dtype=torch.float64, requires_grad=True)
        YOLOv2Loss(VOC_ANCHORS, 4)(raw, targets, seen=12800)["coord"].backward()
        cell, anchor = divmod(match.pred_index.item(), 5)
        row, col = divmod(cell, grid)
        grad = raw.grad.view(1, 5, 9, grid, grid)[0, anchor, 2:4, row, col]  # [2] tw, th
        found.append((anchor, -grad / (2 - w * h)))
        assert anchor == best_shape_anchor(w, h, VOC_ANCHORS.numpy(), grid, grid)
    (anchor_320, target_320), (anchor_608, target_608) = found
    assert anchor_320 == anchor_608
    expected = torch.log(torch.tensor(size_px, dtype=torch.float64) / 32 / VOC_ANCHORS[anchor_320])
    torch.testing.assert_close(target_320, expected)
    torch.testing.assert_close(target_608, expected)
