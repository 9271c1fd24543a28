"""DetectionEvaluator against pycocotools' COCOeval, the VOC devkit's VOCevaldet.m transcribed on
integer pixel boxes, a continuous devkit-style loop and hand sums."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.boxes import box_iou_elementwise, box_iou_elementwise_np
from utils.matching import greedy_match as _greedy_match
from utils.matching import overlaps as _overlaps
from utils.metrics import DetectionEvaluator, to_json

NUM_CLASSES = 4


def random_set(seed, num_images=40, *, difficult_rate=0.0, crowded_image=False, grid=None):
    """Lists of ``[K, 6]`` detections and ``[G, 6]`` ground truths (float64 numpy).

    Ground truths come partly in overlapping same-class clusters; detections are jittered copies
    (several per object) plus random boxes; scores have two decimals so that ties happen.
    With ``grid``, coordinates are multiples of 1 / grid: exact arithmetic, so equal IoUs and
    IoUs exactly at a threshold happen too.
    """
    rng = np.random.default_rng(seed)
    detections, ground_truths = [], []
    for image in range(num_images):
        crowded = crowded_image and image == 0  # > 100 detections of one class
        num_gt = 5 if crowded else int(rng.integers(0, 6))
        corner = rng.uniform(0, 0.7, (num_gt, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.3, (num_gt, 2))], 1)
        labels = rng.integers(0, 1 if crowded else NUM_CLASSES - 1, num_gt)  # last one: no GT
        twins = rng.random(num_gt) < 0.3  # a near copy of an object, same class
        boxes = np.concatenate([boxes, boxes[twins] + rng.normal(0, 0.02, (twins.sum(), 4))])
        labels = np.concatenate([labels, labels[twins]])
        boxes = np.concatenate([boxes[:, :2], np.maximum(boxes[:, 2:], boxes[:, :2])], 1)
        difficult = rng.random(len(boxes)) < difficult_rate
        copies = rng.integers(0, 40 if crowded else 4, len(boxes))
        det_boxes = np.repeat(boxes, copies, 0) + rng.normal(0, 0.02, (copies.sum(), 4))
        det_labels = np.repeat(labels, copies)
        num_random = int(rng.integers(0, 8))
        corner = rng.uniform(0, 0.8, (num_random, 2))
        random_boxes = np.concatenate([corner, corner + rng.uniform(0.02, 0.3, (num_random, 2))], 1)
        det_boxes = np.concatenate([det_boxes, random_boxes])
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2])
        det_labels = np.concatenate([det_labels, rng.integers(0, NUM_CLASSES, num_random)])
        if grid is not None:
            boxes, det_boxes = (np.round(b * grid) / grid for b in (boxes, det_boxes))
        scores = np.round(rng.random(len(det_boxes)), 2)
        ground_truths.append(np.column_stack([boxes, labels, difficult]))
        detections.append(np.column_stack([det_boxes, scores, det_labels]))
    return detections, ground_truths


def evaluate(detections, ground_truths, **kwargs):
    evaluator = DetectionEvaluator(NUM_CLASSES, **kwargs)
    evaluator.update(detections, ground_truths)
    return evaluator.compute()


def run_cocoeval(detections, ground_truths):
    """COCOeval (bbox, area "all") on the same boxes; difficult ground truths as iscrowd=1."""
    annotations = []
    for image, rows in enumerate(ground_truths):
        for x1, y1, x2, y2, label, difficult in rows.tolist():
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image + 1,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(difficult),
                }
            )
    results = [
        {
            "image_id": image + 1,
            "category_id": int(label) + 1,
            "score": score,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
        }
        for image, rows in enumerate(detections)
        for x1, y1, x2, y2, score, label in rows.tolist()
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": i + 1} for i in range(len(ground_truths))],
            "annotations": annotations,
            "categories": [{"id": c + 1} for c in range(NUM_CLASSES)],
        }
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        coco_eval.params.areaRng = [[0.0, 1e10]]
        coco_eval.params.areaRngLbl = ["all"]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def devkit_loop(detections, ground_truths, rule="devkit"):
    """VOCevaldet.m as plain loops on continuous normalised boxes -> per class (voc07, voc12,
    precision, recall), NaN without GT.

    ``rule="unmatched"`` skips ground truths already detected when looking for the best one.
    """
    out = []
    for label in range(NUM_CLASSES):
        gts = [[row for row in rows.tolist() if row[4] == label] for rows in ground_truths]
        num_pos = sum(1 for rows in gts for row in rows if not row[5])
        found = [[False] * len(rows) for rows in gts]
        dets = [(row[4], i, row) for i, rows in enumerate(detections) for row in rows.tolist()]
        dets = sorted([d for d in dets if d[2][5] == label], key=lambda d: -d[0])  # stable
        tp, fp = [], []
        for _, image, box in dets:
            best, best_j = -math.inf, -1
            for j, gt in enumerate(gts[image]):
                if rule == "unmatched" and found[image][j]:
                    continue
                iw = min(box[2], gt[2]) - max(box[0], gt[0])
                ih = min(box[3], gt[3]) - max(box[1], gt[1])
                if iw > 0 and ih > 0:
                    union = (
                        (box[2] - box[0]) * (box[3] - box[1])
                        + (gt[2] - gt[0]) * (gt[3] - gt[1])
                        - iw * ih
                    )
                    if iw * ih / union > best:
                        best, best_j = iw * ih / union, j
            is_tp = is_fp = 0
            if best >= 0.5:
                if not gts[image][best_j][5]:
                    is_tp, is_fp = (0, 1) if found[image][best_j] else (1, 0)
                    found[image][best_j] = True
            else:
                is_fp = 1
            tp.append((tp[-1] if tp else 0) + is_tp)
            fp.append((fp[-1] if fp else 0) + is_fp)
        if num_pos == 0:
            out.append((math.nan, math.nan, None, None))
            continue
        recall = [t / num_pos for t in tp]
        precision = [t / max(t + f, 1e-300) for t, f in zip(tp, fp, strict=True)]
        ap07 = (
            sum(
                max([p for p, r in zip(precision, recall, strict=True) if r >= t], default=0)
                for t in np.arange(0, 1.1, 0.1)
            )
            / 11
        )
        mrec, mpre = [0.0, *recall, 1.0], [0.0, *precision, 0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        ap12 = sum(
            (mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1]
        )
        out.append((ap07, ap12, precision, recall))
    return out


def assert_close_lists(actual, expected, tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert (math.isnan(a) and math.isnan(e)) or abs(a - e) <= tol, (actual, expected)


@pytest.mark.parametrize(("seed", "grid"), [(0, None), (1, None), (2, 8)])
def test_coco_equals_pycocotools(seed, grid):
    detections, ground_truths = random_set(seed, grid=grid)
    res = evaluate(detections, ground_truths)
    coco = run_cocoeval(detections, ground_truths)
    assert res["map_coco"] == pytest.approx(coco.stats[0], abs=1e-9)
    assert res["ap50_coco"] == pytest.approx(coco.stats[1], abs=1e-9)
    assert res["ap75_coco"] == pytest.approx(coco.stats[2], abs=1e-9)
    precision = coco.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    expected = [p.mean() if (p > -1).all() else math.nan for p in precision.transpose(2, 0, 1)]
    assert_close_lists(res["per_class"]["coco"], expected, 1e-9)
    expected50 = [p.mean() if (p > -1).all() else math.nan for p in precision[0].T]
    assert_close_lists(res["per_class"]["ap50_coco"], expected50, 1e-9)
    assert 0.05 < res["map_coco"] < 0.95  # the set is neither trivial nor hopeless


def test_coco_difficult_as_crowd_and_max_detections_equal_pycocotools():
    detections, ground_truths = random_set(7, difficult_rate=0.3, crowded_image=True)
    assert np.bincount(detections[0][:, 5].astype(int)).max() > 100
    res = evaluate(detections, ground_truths)
    coco = run_cocoeval(detections, ground_truths)
    assert [res["map_coco"], res["ap50_coco"], res["ap75_coco"]] == pytest.approx(
        list(coco.stats[:3]), abs=1e-9
    )


@pytest.mark.parametrize("rule", ["devkit", "unmatched"])
@pytest.mark.parametrize(("seed", "grid"), [(3, None), (4, None), (5, 8)])
def test_voc_equals_devkit_loop(seed, grid, rule):
    detections, ground_truths = random_set(seed, difficult_rate=0.2, grid=grid)
    res = evaluate(detections, ground_truths, voc_matching=rule)
    expected = devkit_loop(detections, ground_truths, rule)
    assert_close_lists(res["per_class"]["voc07"], [e[0] for e in expected], 1e-12)
    assert_close_lists(res["per_class"]["voc12"], [e[1] for e in expected], 1e-12)
    for (precision, recall), (_, _, want_precision, want_recall) in zip(
        res["curves"], expected, strict=True
    ):
        if want_recall is not None:
            np.testing.assert_allclose(precision, want_precision, atol=1e-12)
            np.testing.assert_allclose(recall, want_recall, atol=1e-12)
    assert res["map_voc07"] == pytest.approx(np.nanmean([e[0] for e in expected]), abs=1e-12)


def test_matching_rules_differ_where_one_detection_covers_two_objects():
    # Two objects of one class side by side; the second detection overlaps both by >= 0.5 but
    # the first object (its best match) is already taken.
    ground_truths = [np.array([[0.0, 0.0, 0.4, 0.4, 0, 0], [0.1, 0.0, 0.5, 0.4, 0, 0]])]
    detections = [np.array([[0.0, 0.0, 0.4, 0.4, 0.9, 0], [0.04, 0.0, 0.44, 0.4, 0.8, 0]])]
    devkit = evaluate(detections, ground_truths, voc_matching="devkit")
    unmatched = evaluate(detections, ground_truths, voc_matching="unmatched")
    # devkit: TP, FP -> precision [1, 1/2], recall [1/2, 1/2]
    assert devkit["map_voc12"] == pytest.approx(0.5)
    assert devkit["map_voc07"] == pytest.approx(6 / 11)
    assert unmatched["map_voc12"] == pytest.approx(1.0)
    assert unmatched["map_voc07"] == pytest.approx(1.0)
    # COCO takes the free object (IoU 0.136 / 0.184 = 0.739) at thresholds 0.5 to 0.7 only.
    assert devkit["ap50_coco"] == pytest.approx(1.0)
    assert devkit["ap75_coco"] == pytest.approx(51 / 101)
    assert devkit["map_coco"] == pytest.approx((5 + 5 * 51 / 101) / 10)


def test_coco_tie_goes_to_the_last_ground_truth_as_in_pycocotools():
    # The first detection overlaps both objects by exactly 0.1875 / 0.3125; pycocotools gives it
    # the later one, which leaves the earlier one to the second detection (IoU 1).
    ground_truths = [np.array([[0.0, 0.0, 0.5, 0.5, 0, 0], [0.25, 0.0, 0.75, 0.5, 0, 0]])]
    detections = [np.array([[0.125, 0.0, 0.625, 0.5, 0.9, 0], [0.0, 0.0, 0.5, 0.5, 0.8, 0]])]
    res = evaluate(detections, ground_truths)
    coco = run_cocoeval(detections, ground_truths)
    assert res["ap50_coco"] == pytest.approx(1.0)
    assert [res["map_coco"], res["ap50_coco"], res["ap75_coco"]] == pytest.approx(
        list(coco.stats[:3]), abs=1e-12
    )
    assert res["map_voc12"] == pytest.approx(0.5)  # devkit: first object on ties, then duplicate


def test_hand_computed_voc_and_coco():
    # Five objects, three found exactly (scores .9 .8 .6), a miss at .7, a stray box at .5.
    objects = np.array([[0.2 * i, 0.0, 0.2 * i + 0.1, 0.1] for i in range(5)])
    ground_truths = [np.column_stack([objects, np.zeros(5), np.zeros(5)])]
    found = np.column_stack([objects[:3], [0.9, 0.8, 0.6], np.zeros(3)])
    stray = np.array([[0.0, 0.5, 0.1, 0.6, 0.7, 0], [0.5, 0.5, 0.6, 0.6, 0.5, 0]])
    detections = [np.concatenate([found, stray])]
    res = evaluate(detections, ground_truths)
    # precision 1, 1, 2/3, 3/4, 3/5 at recall .2 .2 .4 .6 .6 (order .9 .8 .7 .6 .5)
    precision, recall = res["curves"][0]
    np.testing.assert_allclose(precision, [1, 1, 2 / 3, 3 / 4, 3 / 5])
    np.testing.assert_allclose(recall, [0.2, 0.4, 0.4, 0.6, 0.6])
    # t = 0 .. 0.5; recall 3/5 = 0.6 is below the devkit's threshold 0.6000000000000001
    assert res["map_voc07"] == pytest.approx((5 * 1 + 0.75) / 11)
    assert res["map_voc12"] == pytest.approx(0.4 * 1 + 0.2 * 0.75)
    coco = run_cocoeval(detections, ground_truths)
    assert [res["map_coco"], res["ap50_coco"], res["ap75_coco"]] == pytest.approx(
        list(coco.stats[:3]), abs=1e-12
    )
    assert res["map_coco"] == pytest.approx(res["ap50_coco"])  # every match has IoU 1
    assert res["num_ground_truths"] == 5 and res["num_detections"] == 5


def test_difficult_objects_are_neither_positives_nor_errors():
    ground_truths = [np.array([[0.0, 0.0, 0.3, 0.3, 1, 1], [0.5, 0.5, 0.8, 0.8, 1, 0]])]
    detections = [
        np.array(
            [
                [0.0, 0.0, 0.3, 0.3, 0.9, 1],
                [0.0, 0.0, 0.3, 0.3, 0.8, 1],
                [0.5, 0.5, 0.8, 0.8, 0.7, 1],
            ]
        )
    ]
    res = evaluate(detections, ground_truths)
    for key in ("map_voc07", "map_voc12", "map_coco", "ap50_coco", "ap75_coco"):
        assert res[key] == pytest.approx(1.0), key
    assert res["num_ground_truths"] == 1
    assert res["per_class"]["voc07"][0] != res["per_class"]["voc07"][0]  # NaN: no objects


def test_empty_cases():
    box = [0.1, 0.1, 0.4, 0.4]
    nothing = np.zeros((0, 6))
    no_detections = evaluate([nothing, nothing], [np.array([[*box, 2, 0]]), nothing])
    assert no_detections["map_voc07"] == 0.0 and no_detections["map_coco"] == 0.0
    assert math.isnan(no_detections["per_class"]["voc12"][0])
    assert no_detections["curves"][2][0].shape == (0,)
    no_objects = evaluate([np.array([[*box, 0.5, 1]])], [nothing])
    assert all(math.isnan(no_objects[k]) for k in ("map_voc07", "map_voc12", "map_coco"))
    assert math.isnan(DetectionEvaluator(3).compute()["map_voc07"])
    # a class with detections but no objects is left out of the mean
    stray_class = evaluate([np.array([[*box, 0.9, 2], [*box, 0.8, 1]])], [np.array([[*box, 1, 0]])])
    assert stray_class["map_voc07"] == 1.0 and math.isnan(stray_class["per_class"]["coco"][2])
    # an image without objects only adds false positives
    with_empty_image = evaluate(
        [np.array([[*box, 0.5, 1]]), np.array([[*box, 0.9, 1]])],
        [np.array([[*box, 1, 0]]), nothing],
    )
    assert with_empty_image["map_voc12"] == pytest.approx(0.5)
    assert with_empty_image["num_images"] == 2


def test_batches_equal_one_call_and_tensors_equal_arrays():
    detections, ground_truths = random_set(11, num_images=30, difficult_rate=0.1)
    whole = evaluate(detections, ground_truths)
    evaluator = DetectionEvaluator(NUM_CLASSES)
    for lo, hi in [(0, 7), (7, 8), (8, 8), (8, 30)]:
        evaluator.update(
            [torch.as_tensor(d, dtype=torch.float64) for d in detections[lo:hi]],
            [torch.as_tensor(g) for g in ground_truths[lo:hi]],
        )
    batched = evaluator.compute()
    assert json.dumps(to_json(batched)) == json.dumps(to_json(whole))
    evaluator.reset()
    evaluator.update(detections[:3], ground_truths[:3])
    assert evaluator.compute()["num_images"] == 3


def test_float32_tensors_and_empty_shapes_are_accepted():
    evaluator = DetectionEvaluator(2, class_names=["cat", "dog"])
    evaluator.update(
        [torch.tensor([[0.1, 0.1, 0.5, 0.5, 0.9, 1.0]]), torch.zeros(0)],
        [torch.tensor([[0.1, 0.1, 0.5, 0.5, 1.0, 0.0]]), torch.zeros((0, 6))],
    )
    res = evaluator.compute()
    assert res["map_voc07"] == 1.0 and res["class_names"] == ["cat", "dog"]


@pytest.mark.gpu
def test_cuda_tensors_give_the_cpu_result():
    detections, ground_truths = random_set(12, num_images=10)
    expected = evaluate(detections, ground_truths)
    res = evaluate(
        [torch.as_tensor(d, device="cuda") for d in detections],
        [torch.as_tensor(g, device="cuda") for g in ground_truths],
    )
    assert res["map_coco"] == expected["map_coco"] and res["map_voc07"] == expected["map_voc07"]


@pytest.mark.parametrize(
    ("detections", "ground_truths", "message"),
    [
        ([np.zeros((2, 5))], [np.zeros((0, 6))], r"detections\[0\] has shape \[2, 5\]"),
        ([np.array([[0, 0, 1, 1, 0.5, 7]])], [np.zeros((0, 6))], "class 7.0 is not an integer"),
        ([np.zeros((0, 6))], [np.array([[0, 0, 1, 1, 0.5, 0]])], "class 0.5 is not an integer"),
        ([np.array([[0.5, 0, 0.1, 1, 0.5, 0]])], [np.zeros((0, 6))], "x2 < x1"),
        ([np.array([[0, 0, 1, 1, np.nan, 0]])], [np.zeros((0, 6))], "NaN"),
        ([np.zeros((0, 6))], [], "1 detection entries but 0"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(detections, ground_truths, message):
    with pytest.raises(ValueError, match=message):
        DetectionEvaluator(3).update(detections, ground_truths)


def test_to_json_is_plain_and_thins_curves():
    detections, ground_truths = random_set(13, num_images=30)
    res = evaluate(detections, ground_truths)
    plain = to_json(res, max_curve_points=10)
    text = json.dumps(plain, allow_nan=False)
    assert json.loads(text)["per_class"]["voc07"][NUM_CLASSES - 1] is None
    assert json.loads(text)["map_voc07"] == res["map_voc07"]
    curve = plain["curves"][0]
    assert len(curve["recall"]) == 10 and curve["recall"][-1] == res["curves"][0][1][-1]
    full = to_json(res, max_curve_points=None)["curves"][0]["precision"]
    assert full == res["curves"][0][0].tolist()


def test_box_iou_elementwise_np_is_the_torch_one_bit_for_bit():
    rng = np.random.default_rng(14)
    corners = rng.uniform(0, 0.7, (2000, 2))
    sizes = rng.choice([0.0, 0.1, 0.3], (2000, 2)) * rng.random((2000, 1))  # some empty boxes
    det_boxes = np.concatenate([corners, corners + sizes], 1)
    gt_boxes = det_boxes + rng.normal(0, 0.05, (2000, 4))
    gt_boxes[:, 2:] = np.maximum(gt_boxes[:, 2:], gt_boxes[:, :2])
    iou = box_iou_elementwise_np(det_boxes, gt_boxes)
    expected = box_iou_elementwise(torch.from_numpy(det_boxes), torch.from_numpy(gt_boxes))
    np.testing.assert_array_equal(iou, expected.numpy())
    assert 0.1 < (iou > 0).mean() < 0.9
    grid = box_iou_elementwise_np(det_boxes[:50, None], gt_boxes[None, :40])  # broadcasts
    want = box_iou_elementwise(torch.from_numpy(det_boxes[:50, None]), torch.from_numpy(gt_boxes))
    np.testing.assert_array_equal(grid, want[:, :40].numpy())
    paired, crowd = _overlaps(det_boxes, gt_boxes)
    np.testing.assert_array_equal(paired, iou)
    want_crowd = np.zeros(len(iou))  # intersection / detection area, from the definition
    for i, (d, g) in enumerate(zip(det_boxes.tolist(), gt_boxes.tolist(), strict=True)):
        w, h = min(d[2], g[2]) - max(d[0], g[0]), min(d[3], g[3]) - max(d[1], g[1])
        want_crowd[i] = w * h / ((d[2] - d[0]) * (d[3] - d[1])) if w > 0 and h > 0 else 0.0
    np.testing.assert_allclose(crowd, want_crowd, rtol=1e-12)


def test_greedy_match_docstring_example():
    pair_det, pair_gt = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 1])
    iou = np.array([0.8, 0.6, 0.7, 0.65, 0.9])
    det_gt = _greedy_match(
        pair_det, pair_gt, iou, np.zeros(5, bool), np.zeros(3, np.int64), np.array([0.5, 0.75]), 2
    )
    assert det_gt.tolist() == [[0, 1, -1], [0, -1, 1]]
