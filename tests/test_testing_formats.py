"""The test script on each dataset format: the same numbers, and a COCO results file that
pycocotools scores to the numbers metrics.json holds."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import test_yolov2
from utils.demo import DEMO_CLASSES_FILE
from utils.export_dataset import export_coco, export_yolo
from utils.voc import load_classes
from yolo.checkpoint import FORMAT, save_checkpoint
from yolo.model import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(tmp_path_factory, demo_root) -> Path:
    """A random tiny model on the demo's classes, biased to many confident boxes."""
    classes = load_classes(demo_root / DEMO_CLASSES_FILE)
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=len(classes), num_anchors=5)
    with torch.no_grad():
        model.head.conv.bias.view(5, 5 + len(classes))[:, 4] = 2.0  # [A*(5+C)] -> [A, 5+C]
    state = {"format": FORMAT, "model": model.state_dict(), "classes": classes,
             "config": {"model": "tiny", "eval_img_size": 96},
             "anchors": [[1.0, 1.0], [2.0, 2.0], [3.0, 4.0], [5.0, 3.0], [6.0, 6.0]]}  # fmt: skip
    return save_checkpoint(state, tmp_path_factory.mktemp("weights") / "tiny.pt")


def run_test(weights: Path, out: Path, *data: str) -> dict:
    argv = ["--weights", str(weights), "--out", str(out), "--device", "cpu", "--workers", "0",
            "--fps-iters", "1", "--num-vis-images", "0", *data]  # fmt: skip
    assert test_yolov2.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_voc_coco_and_yolo_give_the_same_numbers_and_a_scorable_results_file(
    tmp_path, demo_root, weights
):
    classes = load_classes(demo_root / DEMO_CLASSES_FILE)
    [coco_json] = export_coco(demo_root, [("demo", "val")], classes, tmp_path / "coco")
    data_yaml = export_yolo(demo_root, [("demo", "val")], classes, tmp_path / "yolo")
    voc_results = tmp_path / "voc-as-coco.json"
    voc = run_test(weights, tmp_path / "voc", "--data", str(demo_root), "--val-set", "demo:val",
                   "--save-coco-results", str(voc_results))  # fmt: skip
    results = tmp_path / "coco-results.json"
    coco = run_test(weights, tmp_path / "c", "--data", str(coco_json),
                    "--save-coco-results", str(results))  # fmt: skip
    yolo = run_test(weights, tmp_path / "y", "--data", str(data_yaml))
    assert voc["num_detections"] > 8 * 100  # past COCO's 100 a image: the caps differ
    for key in ("map_voc07", "map_voc12", "map_coco", "num_detections"):
        assert voc[key] == coco[key] == yolo[key], key
    assert voc["coco_stats"] == yolo["coco_stats"]
    truth, stats = cocoeval(coco_json, results)
    np.testing.assert_allclose(coco["coco_stats"], stats, rtol=0, atol=1e-12)
    # a VOC set's results file numbers its images as the export does: the same scores
    np.testing.assert_allclose(cocoeval(coco_json, voc_results)[1], stats, rtol=0, atol=1e-12)
    written = json.loads(results.read_text())
    assert {r["category_id"] for r in written} <= {c["id"] for c in truth.dataset["categories"]}
    counts = per_image_counts(written, truth)
    assert max(counts) == 100 and len(written) < coco["num_detections"]  # each image's best 100


def per_image_counts(written: list, truth: COCO) -> list[int]:
    counts = {image_id: 0 for image_id in truth.getImgIds()}
    for row in written:
        counts[row["image_id"]] += 1
    return list(counts.values())


def cocoeval(truth_file: Path, results_file: Path) -> tuple[COCO, np.ndarray]:
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(truth_file))
        scored = COCOeval(truth, truth.loadRes(str(results_file)), "bbox")
        scored.evaluate()
        scored.accumulate()
        scored.summarize()
    return truth, scored.stats
