"""DetectionEvaluator against the PASCAL VOC devkit's VOCevaldet.m, transcribed statement by
statement and run, as the devkit runs, on integer pixel boxes (1-based, inclusive, "+1" widths)
and result-file values; the evaluator gets the same boxes through the VOC pixel frame."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from utils.metrics import DetectionEvaluator

NUM_CLASSES = 4  # the last class has no objects
MIN_OVERLAP = 0.5  # VOCopts.minoverlap
POWER_OF_TWO_SIZES = ((16, 16), (32, 64), (64, 32), (128, 128), (256, 64))
VOC_SIZES = ((500, 375), (375, 500), (333, 500), (500, 353), (481, 299))


def matlab_max(values: list[float]) -> float | None:
    """Matlab's ``max``: NaN skipped unless all are NaN; None for an empty array."""
    if not values:
        return None
    numbers = [v for v in values if not math.isnan(v)]
    return max(numbers) if numbers else math.nan


def vocevaldet(gt_boxes, gt_difficult, detections, stats: Counter | None = None):
    """VOCevaldet.m (VOC2007's, with VOCap.m for VOC2012) for one class.

    ``gt_boxes[i]``: the class's objects in image i as ``[xmin, ymin, xmax, ymax]`` (the
    devkit's ``gt(i).BB`` columns), ``gt_difficult[i]`` their flags; ``detections``: the
    result-file lines ``(image index, confidence, b1, b2, b3, b4)`` in file order. Returns
    ``(rec, prec, ap07, ap12)``; ``stats`` counts overlaps exactly at the threshold and ties.
    """
    stats = Counter() if stats is None else stats
    npos = sum(not flag for flags in gt_difficult for flag in flags)
    found = [[False] * len(boxes) for boxes in gt_boxes]
    si = sorted(range(len(detections)), key=lambda d: -detections[d][1])  # stable, as sort()
    tp, fp = [0] * len(si), [0] * len(si)
    for d, line in enumerate(si):
        i, _, *bb = detections[line]
        ovmax, jmax = -math.inf, None
        for j, bbgt in enumerate(gt_boxes[i]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1])]
            bi += [min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                    + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                    - iw * ih
                )
                ov = iw * ih / ua
                stats["at_threshold"] += ov == MIN_OVERLAP
                stats["tied"] += ov == ovmax
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= MIN_OVERLAP:
            if not gt_difficult[i][jmax]:
                if not found[i][jmax]:
                    tp[d] = 1  # true positive
                    found[i][jmax] = True
                else:
                    fp[d] = 1  # false positive (multiple detection)
        else:
            fp[d] = 1  # false positive
    for d in range(1, len(si)):  # cumsum
        tp[d] += tp[d - 1]
        fp[d] += fp[d - 1]
    rec = [t / npos for t in tp]
    prec = [t / (f + t) if f + t else math.nan for t, f in zip(tp, fp, strict=True)]
    ap07 = 0.0
    for t in np.arange(0, 1.1, 0.1):  # t=0:0.1:1
        p = matlab_max([p for p, r in zip(prec, rec, strict=True) if r >= t])
        ap07 = ap07 + (0 if p is None else p) / 11
    mrec, mpre = [0, *rec, 1], [0, *prec, 0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = matlab_max([mpre[i], mpre[i + 1]])
    ap12 = 0.0
    for i in range(1, len(mrec)):  # find(mrec(2:end)~=mrec(1:end-1))+1, then sum
        if mrec[i] != mrec[i - 1]:
            ap12 = ap12 + (mrec[i] - mrec[i - 1]) * mpre[i]
    return rec, prec, ap07, ap12


def _object(rng, width: int, height: int) -> list[int]:
    """A VOC box (xmin, ymin, xmax, ymax): 1-20 px (a third of them 1 px wide or high) or up to
    half the image, inside it."""
    sides = []
    for size in (width, height):
        side = int(rng.integers(1, 21) if rng.random() < 0.6 else rng.integers(1, size // 2 + 2))
        sides.append(1 if rng.random() < 0.15 else min(side, size))
    x1, y1 = int(rng.integers(1, width - sides[0] + 2)), int(rng.integers(1, height - sides[1] + 2))
    return [x1, y1, x1 + sides[0] - 1, y1 + sides[1] - 1]


def _detection(rng, box, *, continuous: bool) -> list[float]:
    """A shifted copy of a VOC box as a result-file line's values (x2 >= x1 - 1: positive width
    in the devkit's +1 arithmetic)."""
    if not continuous:
        x1, y1, x2, y2 = (v + int(rng.integers(-1, 2)) for v in box)
        return [x1, y1, max(x2, x1), max(y2, y1)]
    side = max(box[2] - box[0], box[3] - box[1]) + 1
    x1, y1, x2, y2 = np.array([box[0] - 1, box[1] - 1, box[2], box[3]]) + rng.normal(
        0, 0.05 * side + 0.2, 4
    )  # continuous pixel frame
    return [float(x1) + 1, float(y1) + 1, float(max(x2, x1)), float(max(y2, y1))]


def pixel_set(seed: int, sizes, num_images: int = 40, *, continuous: bool = False) -> list[dict]:
    """Images as the devkit sees them: ``size`` (width, height), ``objects`` rows ``[xmin, ymin,
    xmax, ymax, class, difficult]`` (integers), ``detections`` rows ``[b1, b2, b3, b4, score,
    class]`` in file order. Same-class twins, duplicates, stray boxes, wrong classes; scores in
    tenths, so that ties abound."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        width, height = sizes[int(rng.integers(len(sizes)))]
        objects = []
        for _ in range(int(rng.integers(0, 7))):
            box, label = _object(rng, width, height), int(rng.integers(0, NUM_CLASSES - 1))
            objects.append([*box, label, int(rng.random() < 0.2)])
            if rng.random() < 0.3:  # a same-class neighbour
                twin = _detection(rng, box, continuous=False)
                twin = [
                    min(max(v, 1), limit)
                    for v, limit in zip(twin, (width, height) * 2, strict=True)
                ]
                objects.append([*twin, label, int(rng.random() < 0.2)])
        detections = []
        for *box, label, _ in objects:
            for _ in range(int(rng.integers(0, 4))):
                wrong = rng.random() < 0.1
                label = int(rng.integers(0, NUM_CLASSES)) if wrong else label
                detections.append([*_detection(rng, box, continuous=continuous), 0, label])
        for _ in range(int(rng.integers(0, 4))):
            box = _object(rng, width, height)
            detections.append([*_detection(rng, box, continuous=continuous), 0, rng.integers(4)])
        for row in detections:
            row[4] = int(rng.integers(0, 10)) / 10
        images.append({"size": (width, height), "objects": objects, "detections": detections})
    return images


def to_pixel_frame(rows, width: int, height: int) -> np.ndarray:
    """Rows of VOC values ``[b1, b2, b3, b4, a, b]`` -> ``[N, 6]`` with the box normalised in
    the VOC pixel frame (docs/design.md): ((b1 - 1) / W, (b2 - 1) / H, b3 / W, b4 / H)."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    out = rows.copy()
    out[:, :4] = (rows[:, :4] - [1, 1, 0, 0]) / [width, height, width, height]
    return out


def evaluate_pixel_set(images) -> dict:
    evaluator = DetectionEvaluator(NUM_CLASSES)
    evaluator.update(
        [to_pixel_frame(image["detections"], *image["size"]) for image in images],
        [to_pixel_frame(image["objects"], *image["size"]) for image in images],
    )
    return evaluator.compute()


def devkit_per_class(images, stats: Counter | None = None) -> list:
    """``vocevaldet`` for every class -> (rec, prec, ap07, ap12), or None without positives."""
    out = []
    for label in range(NUM_CLASSES):
        objects = [[row for row in image["objects"] if row[4] == label] for image in images]
        lines = [
            (i, row[4], *row[:4])
            for i, image in enumerate(images)
            for row in image["detections"]
            if row[5] == label
        ]
        if not any(not row[5] for rows in objects for row in rows):
            out.append(None)
            continue
        gt_boxes = [[row[:4] for row in rows] for rows in objects]
        gt_difficult = [[bool(row[5]) for row in rows] for rows in objects]
        out.append(vocevaldet(gt_boxes, gt_difficult, lines, stats))
    return out


def assert_equals_devkit(res: dict, expected: list, curve_tol: float) -> None:
    """Precision and recall within ``curve_tol`` (0: the same true and false positives), APs
    within 1e-15 (the devkit sums its terms one by one)."""
    for label, want in enumerate(expected):
        if want is None:
            assert math.isnan(res["per_class"]["voc07"][label])
            continue
        rec, prec, ap07, ap12 = want
        precision, recall = res["curves"][label]
        np.testing.assert_allclose(recall, rec, rtol=0, atol=curve_tol)
        np.testing.assert_allclose(precision, np.nan_to_num(prec), rtol=0, atol=curve_tol)
        assert res["per_class"]["voc07"][label] == pytest.approx(ap07, abs=1e-15), label
        assert res["per_class"]["voc12"][label] == pytest.approx(ap12, abs=1e-15), label


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_equals_vocevaldet_on_integer_boxes(seed):
    # Sides that are powers of two make the pixel frame exact in binary floating point, so
    # the devkit's exact ties (IoU exactly 0.5, two equal IoUs) must come out the same.
    images = pixel_set(seed, POWER_OF_TWO_SIZES)
    stats = Counter()
    expected = devkit_per_class(images, stats)
    assert stats["at_threshold"] > 0 and stats["tied"] > 0  # the hard cases are there
    assert sum(e is not None for e in expected) == NUM_CLASSES - 1
    assert_equals_devkit(evaluate_pixel_set(images), expected, curve_tol=0.0)


@pytest.mark.parametrize("seed", [3, 4])
def test_voc_equals_vocevaldet_on_voc_sized_images(seed):
    images = pixel_set(seed, VOC_SIZES, continuous=True)
    assert_equals_devkit(evaluate_pixel_set(images), devkit_per_class(images), curve_tol=1e-12)


def test_voc07_reads_recall_at_the_devkits_float_thresholds():
    # Ten objects; recall reaches exactly 3/10, 6/10 and 7/10, which are below the devkit's
    # thresholds 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001.
    objects = [[10 * k + 1, 1, 10 * k + 5, 5, 0, 0] for k in range(10)]
    hits = [True, True, True, False, True, True, True, False, True, False, False]
    detections, found = [], iter(objects)
    for rank, hit in enumerate(hits):
        box = next(found)[:4] if hit else [1, 50, 5, 54]
        detections.append([*box, 1 - rank / 16, 0])
    images = [{"size": (128, 64), "objects": objects, "detections": detections}]
    res = evaluate_pixel_set(images)
    expected = devkit_per_class(images)
    assert_equals_devkit(res, expected, curve_tol=0.0)
    exact_tenths = (3 * 1 + 1 + 3 * 6 / 7 + 2 * 7 / 9) / 11  # what thresholds k/10 would give
    assert res["per_class"]["voc07"][0] == pytest.approx((3 * 1 + 3 * 6 / 7 + 7 / 9) / 11)
    assert res["per_class"]["voc07"][0] < exact_tenths - 0.1


def test_tied_scores_keep_the_file_order():
    # One object per image; the image-0 detection misses, the image-1 one hits; equal scores.
    objects = [[[1, 1, 10, 10, 0, 0]], [[1, 1, 10, 10, 0, 0]]]
    detections = [[[20, 20, 30, 30, 0.5, 0]], [[1, 1, 10, 10, 0.5, 0]]]
    images = [
        {"size": (32, 32), "objects": o, "detections": d}
        for o, d in zip(objects, detections, strict=True)
    ]
    res = evaluate_pixel_set(images)
    assert_equals_devkit(res, devkit_per_class(images), curve_tol=0.0)
    assert res["map_voc12"] == pytest.approx(0.25)  # FP then TP: precision 1/2 at recall 1/2
    assert res["map_voc12"] == evaluate_pixel_set(images[::-1])["map_voc12"] - 0.25


def test_one_pixel_objects_match_one_pixel_detections():
    objects = [[5, 7, 5, 7, 0, 0], [9, 2, 9, 30, 1, 0], [3, 20, 4, 21, 2, 0]]
    detections = [[*row[:4], 0.9, row[4]] for row in objects]
    images = [{"size": (40, 33), "objects": objects, "detections": detections}]
    res = evaluate_pixel_set(images)
    assert res["per_class"]["voc07"][:3] == [1.0, 1.0, 1.0]
    assert_equals_devkit(res, devkit_per_class(images), curve_tol=0.0)
