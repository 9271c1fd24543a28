"""DetectionEvaluator's ``coco_stats`` and ``write_coco_results`` against pycocotools' COCOeval
on COCO-style sets: crowd regions, segmentation-like areas, all size ranges, empty images,
images without detections, a class without ground truth, ties in score, > 100 detections."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.coco_eval import write_coco_results
from utils.metrics import DetectionEvaluator

NUM_CLASSES = 5  # the last one never has ground truth
CATEGORY_IDS = [1, 3, 7, 8, 90]  # COCO-like gaps


def _boxes_px(rng, count, height, width):
    """``[count, 4]`` pixel xyxy boxes inside the image, sides 4..0.9 of the image."""
    side = np.exp(rng.uniform(np.log(4), np.log(0.9 * min(height, width)), (count, 2)))
    corner = rng.uniform(0, 1, (count, 2)) * (np.array([width, height]) - side)
    return np.concatenate([corner, corner + side], 1)


def _jitter(rng, boxes, copies, height, width):
    """Jittered copies of pixel boxes, clipped to the image, never inside out."""
    out = np.repeat(boxes, copies, 0)
    out = out + rng.normal(0, 0.08, out.shape) * np.tile(out[:, 2:] - out[:, :2], 2)
    out = np.clip(out, 0, [width, height, width, height])
    return np.concatenate([out[:, :2], np.maximum(out[:, 2:], out[:, :2])], 1)


def coco_style_set(seed, num_images=36):
    """Per image: dict(size, dets [K, 6], gts [G, 6], areas [G], crowd [C, 4], crowd_labels)
    in normalised coordinates; image 0 has > 100 detections of one class, image 1 nothing,
    image 2 objects but no detections, image 3 detections but no objects."""
    rng = np.random.default_rng(seed)
    images = []
    for image in range(num_images):
        height, width = (int(v) for v in rng.integers(120, 700, 2))
        num_gt = {0: 6, 1: 0, 3: 0}.get(image, int(rng.integers(1, 7)))
        gt_px = _boxes_px(rng, num_gt, height, width)
        labels = rng.integers(0, 1 if image == 0 else NUM_CLASSES - 1, num_gt)
        num_crowd = 0 if image < 4 else int(rng.random() < 0.4) * int(rng.integers(1, 3))
        crowd_px = _boxes_px(rng, num_crowd, height, width)
        crowd_labels = rng.integers(0, NUM_CLASSES - 1, num_crowd)
        copies = rng.integers(0, 40 if image == 0 else 5, num_gt + num_crowd)
        det_px = _jitter(rng, np.concatenate([gt_px, crowd_px]), copies, height, width)
        det_labels = np.repeat(np.concatenate([labels, crowd_labels]), copies)
        wrong = rng.random(len(det_labels)) < 0.1
        det_labels[wrong] = rng.integers(0, NUM_CLASSES, wrong.sum())
        num_random = 0 if image in (1, 2) else int(rng.integers(0, 10))
        det_px = np.concatenate([det_px, _boxes_px(rng, num_random, height, width)])
        det_labels = np.concatenate([det_labels, rng.integers(0, NUM_CLASSES, num_random)])
        if image in (1, 2):
            det_px, det_labels = det_px[:0], det_labels[:0]
        scale = np.array([width, height, width, height], dtype=float)
        gt_area = (gt_px[:, 2] - gt_px[:, 0]) * (gt_px[:, 3] - gt_px[:, 1])
        scores = np.round(rng.random(len(det_px)), 2)  # two decimals: ties
        images.append(
            {
                "size": (height, width),
                "dets": np.column_stack([det_px / scale, scores, det_labels]),
                "gts": np.column_stack([gt_px / scale, labels, np.zeros(num_gt)]),
                "areas": gt_area * rng.uniform(0.4, 1.0, num_gt),  # like a mask's area
                "crowd": crowd_px / scale,
                "crowd_labels": crowd_labels,
            }
        )
    return images


def coco_ground_truth(images, *, given_areas=True) -> dict:
    """COCO JSON dict: pixel xywh, each image's objects first, then its crowd regions."""
    annotations = []
    for image_id, item in enumerate(images, start=1):
        height, width = item["size"]
        rows = [(*r[:4], r[4], 0, a) for r, a in zip(item["gts"], item["areas"], strict=True)]
        rows += [
            (*b, label, 1, None)
            for b, label in zip(item["crowd"], item["crowd_labels"], strict=True)
        ]
        for x1, y1, x2, y2, label, crowd, area in rows:
            bbox = [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height]
            if area is None or not given_areas:
                area = bbox[2] * bbox[3]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[int(label)],
                    "bbox": bbox,
                    "area": float(area),
                    "iscrowd": crowd,
                }
            )
    return {
        "images": [{"id": i + 1} for i in range(len(images))],
        "annotations": annotations,
        "categories": [{"id": c} for c in CATEGORY_IDS],
    }


def run_cocoeval(dataset: dict, results) -> np.ndarray:
    """COCOeval (bbox, default parameters) -> stats ``[12]``."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def evaluate(images, *, sizes=True, areas=True, crowds=True, batch=8):
    evaluator = DetectionEvaluator(NUM_CLASSES)
    for lo in range(0, len(images), batch):
        part = images[lo : lo + batch]
        evaluator.update(
            [torch.from_numpy(x["dets"]) for x in part],
            [x["gts"] for x in part],
            image_sizes=[x["size"] for x in part] if sizes else None,
            gt_areas=[x["areas"] for x in part] if areas else None,
            crowd_boxes=[x["crowd"] for x in part] if crowds else None,
            crowd_labels=[x["crowd_labels"] for x in part] if crowds else None,
        )
    return evaluator.compute()


def records(images):
    return [(i + 1, x["size"], torch.from_numpy(x["dets"])) for i, x in enumerate(images)]


def results_list(images, tmp_path) -> list:
    path = tmp_path / "results.json"
    write_coco_results(records(images), CATEGORY_IDS, path)
    return json.loads(path.read_text())


def every_detection(images) -> list:
    """The uncapped COCO results list, written by hand (pixels, full precision)."""
    results = []
    for i, x in enumerate(images):
        height, width = x["size"]
        for x1, y1, x2, y2, score, label in x["dets"].tolist():
            bbox = [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height]
            results.append({"image_id": i + 1, "category_id": CATEGORY_IDS[int(label)],
                            "bbox": bbox, "score": score})  # fmt: skip
    return results


def each_images_best(results: list, count: int = 100) -> list:
    """A plain loop: per image, the ``count`` highest scores (ties: the earlier entry)."""
    kept = []
    for image_id in sorted({r["image_id"] for r in results}):
        mine = [r for r in results if r["image_id"] == image_id]
        kept += sorted(mine, key=lambda r: -r["score"])[:count]  # sorted() is stable
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_stats_equal_pycocotools(seed, tmp_path):
    images = coco_style_set(seed)
    assert sum(len(x["crowd"]) for x in images) > 0
    assert np.bincount(images[0]["dets"][:, 5].astype(int)).max() > 100
    res = evaluate(images)
    everything = every_detection(images)
    expected = run_cocoeval(coco_ground_truth(images), each_images_best(everything))
    uncapped = run_cocoeval(coco_ground_truth(images), everything)
    assert np.abs(uncapped - expected).max() > 1e-6  # the cap per image is what COCO scores
    np.testing.assert_allclose(
        run_cocoeval(coco_ground_truth(images), results_list(images, tmp_path)), expected,
        rtol=0, atol=1e-12,
    )  # fmt: skip
    assert len(res["coco_stats"]) == 12
    np.testing.assert_allclose(res["coco_stats"], expected, rtol=0, atol=1e-12)
    assert all(0.02 < s < 0.98 for s in res["coco_stats"]), res["coco_stats"]  # not trivial
    assert res["coco_stats"][:3] == pytest.approx(
        [res["map_coco"], res["ap50_coco"], res["ap75_coco"]], abs=1e-12
    )
    assert math.isnan(res["per_class"]["coco"][-1])  # the class without ground truth


def test_default_areas_are_the_pixel_boxes(tmp_path):
    images = coco_style_set(3)
    res = evaluate(images, areas=False)
    dataset = coco_ground_truth(images, given_areas=False)
    expected = run_cocoeval(dataset, results_list(images, tmp_path))
    np.testing.assert_allclose(res["coco_stats"], expected, rtol=0, atol=1e-12)
    given = evaluate(images)["coco_stats"]
    assert given[3:6] != res["coco_stats"][3:6]  # the areas drive the ranges


def test_without_sizes_the_size_entries_are_nan_and_the_rest_exact():
    images = coco_style_set(4)
    full = evaluate(images)["coco_stats"]
    blind = evaluate(images, sizes=False)["coco_stats"]
    for i, (a, b) in enumerate(zip(full, blind, strict=True)):
        assert math.isnan(b) if i in (3, 4, 5, 9, 10, 11) else a == b, (i, a, b)


def test_a_range_without_objects_is_minus_one_as_in_pycocotools(tmp_path):
    images = coco_style_set(5, num_images=12)
    for item in images:  # every object medium or large
        item["areas"] = np.maximum(item["areas"], 40.0**2)
    res = evaluate(images)
    expected = run_cocoeval(coco_ground_truth(images), results_list(images, tmp_path))
    assert res["coco_stats"][3] == res["coco_stats"][9] == -1.0
    np.testing.assert_allclose(res["coco_stats"], expected, rtol=0, atol=1e-12)


def test_crowd_regions_absorb_detections_and_are_not_positives():
    crowd = np.array([[0.1, 0.1, 0.5, 0.5]])
    dets = torch.tensor(
        [
            [0.1, 0.1, 0.45, 0.5, 0.95, 0.0],  # IoU 0.875 with the crowd region
            [0.2, 0.2, 0.3, 0.3, 0.9, 0.0],  # inside it: IoU 0.0625, crowd IoU 1
            [0.6, 0.6, 0.9, 0.9, 0.8, 0.0],  # the object
        ]
    )
    gts = np.array([[0.6, 0.6, 0.9, 0.9, 0, 0]])
    evaluator = DetectionEvaluator(1)
    evaluator.update(
        [dets], [gts], image_sizes=[(100, 100)], crowd_boxes=[crowd], crowd_labels=[[0]]
    )
    res = evaluator.compute()
    assert res["coco_stats"][0] == pytest.approx(1.0)  # both count neither way
    # VOC: a crowd region is a difficult object, matched by plain IoU >= 0.5: the first
    # detection is ignored, the second a false positive before the true one.
    assert res["map_voc12"] == pytest.approx(0.5)
    assert res["num_ground_truths"] == 1


def test_writer_file_read_by_pycocotools(tmp_path):
    images = coco_style_set(6, num_images=10)
    path = tmp_path / "out" / "detections.json"
    path.parent.mkdir()
    count = write_coco_results(records(images), dict(enumerate(CATEGORY_IDS)), path)
    assert count == sum(min(len(x["dets"]), 100) for x in images)
    first = json.loads(path.read_text())[0]
    assert set(first) == {"image_id", "category_id", "bbox", "score"}
    expected = run_cocoeval(coco_ground_truth(images), str(path))
    np.testing.assert_allclose(evaluate(images)["coco_stats"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_sizes": [(10, 10)] * 2}, "image_sizes must hold one positive"),
        ({"image_sizes": [(0, 10)]}, "image_sizes must hold one positive"),
        ({"gt_areas": [[1.0, 2.0]]}, "gt_areas must hold one"),
        ({"gt_areas": [[-1.0]]}, "negative"),
        ({"crowd_boxes": [np.zeros((1, 4))]}, "go together"),
        ({"crowd_boxes": [np.zeros((1, 4))], "crowd_labels": [[]]}, "one class per crowd"),
        ({"crowd_boxes": [np.zeros((1, 4))], "crowd_labels": [[3]]}, "crowd_boxes class 3.0"),
    ],
)
def test_bad_extras_are_refused_with_a_clear_message(kwargs, message):
    evaluator = DetectionEvaluator(2)
    with pytest.raises(ValueError, match=message):
        evaluator.update([np.zeros((0, 6))], [np.array([[0, 0, 0.5, 0.5, 0, 0]])], **kwargs)
