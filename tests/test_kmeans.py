"""k-means of box shapes (utils/kmeans.py) against a plain Lloyd loop, and kmeans.py with its
engine yolo/kmeans.py: flags, files written, errors."""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import kmeans
import yolo.kmeans as engine
from utils.anchors import default_anchors, load_anchors, read_voc_box_sizes
from utils.boxes import wh_iou
from utils.demo import DEMO_CLASSES
from utils.kmeans import kmeanspp_init, lloyd, run_kmeans
from yolo.config import parse_k


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """k-means runs many small ops: a second thread only waits on a busy machine (kmeans.py
    runs with --threads 1 too)."""
    with engine.torch_threads(1):
        yield


PLANTED = torch.tensor([[0.05, 0.08], [0.2, 0.45], [0.5, 0.3], [0.85, 0.9]])  # by area


def planted_boxes(per_cluster: int = 300, spread: float = 0.03, seed: int = 0) -> torch.Tensor:
    """Boxes ``[4 * per_cluster, 2]`` scattered tightly (log-normal) around :data:`PLANTED`."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.exp(spread * torch.randn(len(PLANTED), per_cluster, 2, generator=generator))
    return (PLANTED[:, None] * noise).reshape(-1, 2).clamp(max=1.0)  # [4, n, 2] -> [4n, 2]


def random_box_sizes(generator: torch.Generator, num_boxes: int, quantise: bool) -> torch.Tensor:
    wh = torch.rand(num_boxes, 2, generator=generator) * 0.98 + 0.02
    return (wh * 20).ceil() / 20 if quantise else wh  # quantised: many duplicates and IoU ties


def plain_lloyd(wh: torch.Tensor, centres: torch.Tensor, max_iter: int):
    """One restart from ``centres`` ``[k, 2]``, written plainly: each box to its centre of highest
    IoU (the first on ties); each centre to the mean of its boxes, the i-th empty cluster to the
    i-th box of lowest IoU with its centre; the first update kept, then each one that raises
    the mean IoU or re-seeds. Returns the centres, the mean IoU and the updates kept."""

    def assign(centres):
        iou = torch.stack([wh_iou(wh, centre) for centre in centres], dim=1)  # [M, k]
        best_iou, labels = iou.max(dim=1)
        return best_iou, labels, best_iou.double().mean()

    best_iou, labels, mean_iou = assign(centres)
    kept = 0
    for _ in range(max_iter):
        farthest = torch.argsort(best_iou, stable=True).tolist()
        new_centres = centres.clone()
        for c in range(len(centres)):
            members = wh[labels == c]
            new_centres[c] = members.double().mean(dim=0) if len(members) else wh[farthest.pop(0)]
        reseeded = len(farthest) < len(wh)
        new_best, new_labels, new_mean = assign(new_centres)
        if not (kept == 0 or new_mean > mean_iou or reseeded):
            break
        centres, best_iou, labels, mean_iou = new_centres, new_best, new_labels, new_mean
        kept += 1
    return centres, float(mean_iou), kept


# ---------------------------------------------------------------------------------------------
# utils.kmeans


def assert_lloyd_equals_the_plain_loop(wh: torch.Tensor, centres: torch.Tensor) -> None:
    """``lloyd`` from ``centres`` ``[R, k, 2]`` equals ``plain_lloyd`` restart by restart, and
    leaves no cluster empty."""
    final, mean_ious, iterations = lloyd(wh, centres, max_iter=300)
    for restart in range(len(centres)):
        expected, expected_iou, expected_iterations = plain_lloyd(wh, centres[restart], 300)
        torch.testing.assert_close(final[restart], expected, rtol=1e-6, atol=0)
        assert float(mean_ious[restart]) == pytest.approx(expected_iou, rel=1e-9)
        assert int(iterations[restart]) == expected_iterations
        labels = wh_iou(wh[:, None], final[restart]).argmax(dim=1)  # [M]
        assert len(labels.unique()) == centres.shape[1]  # no cluster left empty


def test_recovers_planted_clusters():
    wh = planted_boxes()
    result = run_kmeans(wh, 4, restarts=5, seed=0)
    torch.testing.assert_close(result.anchors, PLANTED, rtol=0.02, atol=0)
    assert result.mean_iou > 0.93
    assert result.anchors.dtype == torch.float32 and result.anchors.shape == (4, 2)
    assert result.iterations.shape == (5,) and result.restart_ious.shape == (5,)
    assert result.mean_iou == float(result.restart_ious.max())
    areas = result.anchors.prod(dim=1)
    assert torch.all(areas[1:] >= areas[:-1])


def test_mean_iou_is_the_mean_best_iou_of_the_boxes():
    wh = planted_boxes(per_cluster=50, spread=0.2, seed=1)
    result = run_kmeans(wh, 3, restarts=3, seed=2)
    expected = wh_iou(wh[:, None], result.anchors[None]).amax(dim=1).double().mean()
    assert result.mean_iou == pytest.approx(float(expected), abs=1e-9)


def test_deterministic_for_a_seed():
    wh = planted_boxes(per_cluster=100, spread=0.3)
    first, again = run_kmeans(wh, 5, restarts=4, seed=7), run_kmeans(wh, 5, restarts=4, seed=7)
    assert torch.equal(first.anchors, again.anchors)
    assert torch.equal(first.iterations, again.iterations)
    assert torch.equal(first.restart_ious, again.restart_ious)
    init_a = kmeanspp_init(wh, 5, 4, torch.Generator().manual_seed(7))
    init_b = kmeanspp_init(wh, 5, 4, torch.Generator().manual_seed(8))
    assert not torch.equal(init_a, init_b)


@pytest.mark.parametrize("trial", range(6))
def test_lloyd_equals_a_plain_lloyd_loop(trial):
    generator = torch.Generator().manual_seed(trial)
    num_boxes = int(torch.randint(30, 1500, (1,), generator=generator))
    k = int(torch.randint(2, 9, (1,), generator=generator))
    wh = random_box_sizes(generator, num_boxes, quantise=trial % 2 == 1)
    centres = kmeanspp_init(wh, k, 3, generator)  # [3, k, 2]
    centres[2, -1] = centres[2, 0]  # a duplicate centre: its cluster starts empty
    centres[1, 1:] = centres[1, 0]  # k - 1 clusters start empty
    assert_lloyd_equals_the_plain_loop(wh, centres)


def test_lloyd_reseeds_until_no_cluster_is_empty():
    # coarse sizes: the boxes farthest from their centre often share a shape, so clusters
    # re-seeded together coincide and one stays empty, to be re-seeded by a later update
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        wh = (torch.rand(30, 2, generator=generator) * 5).ceil() / 5  # [30, 2], 25 shapes at most
        seeds = wh[torch.randint(30, (4,), generator=generator)]  # [4, 2]
        centres = seeds[:, None].expand(4, 5, 2)  # [4, 5, 2]: the 5 centres of a restart equal
        assert_lloyd_equals_the_plain_loop(wh, centres)


def test_lloyd_stops_at_max_iter():
    wh = random_box_sizes(torch.Generator().manual_seed(0), 500, quantise=False)
    centres = kmeanspp_init(wh, 6, 2, torch.Generator().manual_seed(0))
    final, _, iterations = lloyd(wh, centres, max_iter=2)
    assert iterations.tolist() == [2, 2]
    for restart in range(2):
        torch.testing.assert_close(final[restart], plain_lloyd(wh, centres[restart], 2)[0])


def test_kmeanspp_draws_with_probability_of_squared_distance():
    wh = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.4, 0.4]])
    centres = kmeanspp_init(wh, 2, 30_000, torch.Generator().manual_seed(0))  # [R, 2, 2]
    first_is_small = (centres[:, 0] == wh[0]).all(dim=1)  # [R]
    second = centres[first_is_small, 1]  # [R', 2]
    assert not (second == wh[0]).all(dim=1).any()  # zero distance: never drawn again
    weights = (1 - wh_iou(wh[0], wh[1:])) ** 2  # (1 - 1/4)^2 and (1 - 1/16)^2
    expected = weights / weights.sum()
    observed = torch.stack([(second == wh[j]).all(dim=1).float().mean() for j in (1, 2)])
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.02)
    assert abs(float(first_is_small.float().mean()) - 1 / 3) < 0.02  # first pick uniform


def test_sweep_and_one_cluster():
    wh = planted_boxes(per_cluster=40, spread=0.2)
    sweep = [run_kmeans(wh, k, restarts=2) for k in (1, 2, 3)]
    assert [len(result.anchors) for result in sweep] == [1, 2, 3]
    ious = [result.mean_iou for result in sweep]
    assert ious[0] < ious[1] < ious[2]
    torch.testing.assert_close(sweep[0].anchors[0], wh.double().mean(dim=0).float())
    # k = 1 gives the mean even where a box has the higher mean IoU: the seeds are boxes, not
    # means, so the first update is always kept
    wh = torch.tensor([[0.1, 0.1]] * 50 + [[0.9, 0.9]] * 2)
    result = run_kmeans(wh, 1, restarts=3)
    torch.testing.assert_close(result.anchors[0], wh.double().mean(dim=0).float())
    assert result.mean_iou < float(wh_iou(wh, wh[0]).double().mean())


@pytest.mark.parametrize(
    ("wh", "k", "message"),
    [
        (torch.tensor([[0.1, 0.2], [0.1, 0.2], [0.3, 0.3]]), 3, "k=3 clusters from 2 distinct"),
        (torch.tensor([[0.1, 0.0], [0.2, 0.3]]), 1, "finite and positive"),
        (torch.tensor([[0.1, -0.2], [0.2, 0.3]]), 1, "finite and positive"),
        (torch.tensor([[-0.1, -0.2], [0.2, 0.3]]), 1, "finite and positive"),
        (torch.tensor([[1e-30, 1e-30], [0.2, 0.3]]), 1, "finite and positive"),
        (torch.tensor([[0.1, float("nan")], [0.2, 0.3]]), 1, "finite and positive"),
        (torch.rand(5, 3), 1, r"shape \[M, 2\]"),
        (torch.rand(5, 2), 0, "must be >= 1"),
    ],
)
def test_bad_box_sizes_or_k(wh, k, message):
    with pytest.raises(ValueError, match=message):
        run_kmeans(wh, k)
    with pytest.raises(ValueError, match="must be >= 1"):
        run_kmeans(torch.rand(5, 2), 2, restarts=0)


# ---------------------------------------------------------------------------------------------
# kmeans.py and yolo/kmeans.py


def demo_args(demo_root: Path, out_dir: Path, *extra: str) -> list[str]:
    classes = str(demo_root / "demo_classes.txt")
    base = ["--data-root", str(demo_root), "--sets", "demo:train", "--classes", classes]
    return [*base, "--out-dir", str(out_dir), "--restarts", "3", *extra]


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        kmeans.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data-root", "--sets", "--classes", "--demo", "--k", "--restarts", "--seed"):
        assert flag in text
    for flag in ("--keep-difficult", "--out-dir", "--img-size", "--threads"):
        assert flag in text


def test_end_to_end_on_the_demo_dataset(demo_root, tmp_path, caplog):
    out = tmp_path / "anchors"
    with caplog.at_level(logging.INFO, logger="yolo.kmeans"), engine.torch_threads(2):
        assert kmeans.main(demo_args(demo_root, out, "--k", "2-4")) == 0
        assert torch.get_num_threads() == 2  # restored after the run (--threads 1)
    names = {"kmeans.json", "iou_vs_k.png"}
    names |= {f"anchors-{k}.json" for k in (2, 3, 4)} | {f"clusters-{k}.png" for k in (2, 3, 4)}
    assert {path.name for path in out.iterdir()} == names
    summary = json.loads((out / "kmeans.json").read_text())
    wh = read_voc_box_sizes(demo_root, [("demo", "train")], DEMO_CLASSES)
    assert summary["num_boxes"] == len(wh) and summary["sets"] == ["demo:train"]
    assert summary["img_size"] == 416 and summary["grid_size"] == 13
    assert [entry["k"] for entry in summary["results"]] == [2, 3, 4]
    for entry in summary["results"]:
        anchors = load_anchors(out / entry["anchors_file"])  # [k, 2] grid cells
        assert anchors.shape == (entry["k"], 2)
        assert torch.equal(anchors, torch.tensor(entry["anchors_grid"]))
        assert torch.equal(anchors, torch.tensor(entry["anchors_fraction"]) * 13)
        document = json.loads((out / entry["anchors_file"]).read_text())
        assert document["unit"] == "grid" and document["stride"] == 32
        assert document["img_size"] == 416 and document["mean_iou"] == entry["mean_iou"]
        assert document["darknet_cfg"] == entry["darknet_cfg"]
        cfg_numbers = entry["darknet_cfg"].removeprefix("anchors = ").split(",")
        cfg_anchors = torch.tensor([float(number) for number in cfg_numbers]).view(-1, 2)
        torch.testing.assert_close(cfg_anchors, anchors, rtol=1e-5, atol=0)
        assert len(entry["restart_ious"]) == len(entry["iterations"]) == 3
        assert 0.3 < entry["mean_iou"] <= 1
    ious = [entry["mean_iou"] for entry in summary["results"]]
    assert ious == sorted(ious)
    for name in ("clusters-3.png", "iou_vs_k.png"):
        assert Image.open(out / name).size[0] > 300
    assert "IoU %" in caplog.text and f"{100 * ious[1]:.2f}" in caplog.text
    grid_w, grid_h = summary["results"][1]["anchors_grid"][0]
    assert f"{grid_w:.2f}x{grid_h:.2f}" in caplog.text  # the table shows grid cells
    assert "cells of the 13-cell grid of --img-size 416" in caplog.text  # the size they are for


def test_img_size_scales_the_grid_units_only(demo_root, tmp_path):
    for img_size in ("416", "608"):
        argv = demo_args(demo_root, tmp_path / img_size, "--k", "3", "--img-size", img_size)
        assert kmeans.main(argv) == 0
    at_416, at_608 = (
        json.loads((tmp_path / s / "kmeans.json").read_text()) for s in ("416", "608")
    )
    assert at_608["grid_size"] == 19
    (entry_416,), (entry_608,) = at_416["results"], at_608["results"]
    assert entry_608["anchors_fraction"] == entry_416["anchors_fraction"]
    fractions = torch.tensor(entry_608["anchors_fraction"])
    assert torch.equal(load_anchors(tmp_path / "608" / "anchors-3.json"), fractions * 19)


def test_one_k_writes_no_iou_plot_and_matches_the_library(demo_root, tmp_path):
    out = tmp_path / "one"
    assert kmeans.main(demo_args(demo_root, out, "--k", "3", "--seed", "4")) == 0
    assert not (out / "iou_vs_k.png").exists()
    wh = read_voc_box_sizes(demo_root, [("demo", "train")], DEMO_CLASSES)
    expected = engine.run_kmeans(wh, 3, restarts=3, seed=4).anchors * 13  # grid cells at 416
    assert torch.equal(load_anchors(out / "anchors-3.json"), expected)


def test_keep_difficult_reads_more_boxes(demo_root, tmp_path):
    counts = []
    for flag in ("--no-keep-difficult", "--keep-difficult"):
        kmeans.main(demo_args(demo_root, tmp_path / flag, "--k", "1", flag))
        counts.append(json.loads((tmp_path / flag / "kmeans.json").read_text())["num_boxes"])
    assert counts[0] < counts[1]


def test_demo_flag_uses_the_demo_train_split(demo_root, tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(
        engine, "generate_demo_dataset", lambda root: made.append(root) or demo_root
    )
    argv = ["--demo", "--data-root", "/nowhere", "--k", "2", "--out-dir", str(tmp_path)]
    assert kmeans.main([*argv, "--restarts", "2"]) == 0
    summary = json.loads((tmp_path / "kmeans.json").read_text())
    assert made == [engine.DEMO_ROOT]
    assert summary["data_root"] == str(demo_root) and summary["sets"] == ["demo:train"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "0"], "--k '0'"),
        (["--k", "5-3"], "range such as 1-15"),
        (["--k", "five"], "--k 'five'"),
        (["--k", "1-100"], "from 1 to 64"),
        (["--restarts", "0"], "--restarts must be at least 1"),
        (["--img-size", "400"], "--img-size 400: use a multiple of 32"),
        (["--img-size", "0"], "--img-size 0: use a multiple of 32"),
        (["--sets", "2007"], "NAME:SPLIT"),
    ],
)
def test_bad_values_exit_with_one_clear_line(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        kmeans.main(argv)
    assert message in str(exit_info.value.code)


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        kmeans.main(["--k", "5", "--clusters", "5"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --clusters" in capsys.readouterr().err


def test_user_errors_return_1_with_the_reason(demo_root, voc_writer, tmp_path, caplog):
    assert kmeans.main(["--data-root", str(tmp_path / "none"), "--out-dir", str(tmp_path)]) == 1
    assert "ImageSets/Main/trainval.txt does not exist: check --data-root" in caplog.text
    voc_writer.add("a", [("cat", (1, 1, 33, 25), 0), ("cat", (1, 1, 9, 9), 0)])
    voc_writer.write_set("trainval")
    classes = voc_writer.root / "classes.txt"
    classes.write_text("cat\n")
    few = ["--data-root", str(voc_writer.root), "--sets", "test:trainval"]
    few += ["--classes", str(classes), "--out-dir", str(tmp_path)]
    assert kmeans.main([*few, "--k", "3"]) == 1
    assert "k=3 clusters from 2 distinct box sizes" in caplog.text and "lower k" in caplog.text
    voc = ["--data-root", str(demo_root), "--sets", "demo:train", "--out-dir", str(tmp_path)]
    assert kmeans.main(voc) == 1  # the demo's classes are not VOC's: every object is skipped
    assert "no boxes found" in caplog.text and "--classes FILE" in caplog.text
    assert kmeans.main([*voc, "--strict"]) == 1
    assert "is not in the class list" in caplog.text


def test_parse_k_and_the_table():
    assert parse_k("5") == [5]
    assert parse_k(" 1-15 ") == list(range(1, 16))
    assert parse_k("9-9") == [9]
    for spec in ("", "-3", "1-", "1-2-3", "3-1", "0-4", "a-b"):
        with pytest.raises(ValueError, match="--k"):
            parse_k(spec)
    entries = [
        {"k": 5, "mean_iou": 0.6123, "anchors_grid": [[1.0, 2.0]] * 5, "box_share": [0.2] * 5},
        {"k": 6, "mean_iou": 0.65, "anchors_grid": [[1.5, 2.25]] * 6, "box_share": [1 / 6] * 6},
    ]
    lines = engine.format_kmeans_table(entries, 416).splitlines()
    assert lines[0].split()[:3] == ["k", "IoU", "%"] and "13x13 grid" in lines[0]
    assert lines[1].split()[:5] == ["5", "61.23", "61.0", "1.00x2.00", "20%"]
    assert lines[2].split()[:5] == ["6", "65.00", "-", "1.50x2.25", "17%"]
    anchors_grid = torch.tensor([[1.3221, 1.73145], [11.2364, 10.0071]])
    line = "anchors = 1.3221,1.73145, 11.2364,10.0071"  # yolov2-voc.cfg's numbers
    assert engine.darknet_anchor_line(anchors_grid) == line


@pytest.mark.parametrize("trial", range(3))
def test_anchor_shares_match_a_box_by_box_loop(trial):
    generator = torch.Generator().manual_seed(trial)
    wh = torch.rand(200, 2, generator=generator) * 0.9 + 0.05
    anchors = torch.rand(4, 2, generator=generator) * 0.9 + 0.05
    anchors[3] = anchors[1]  # a tie goes to the first of equal anchors
    counts, ious = [0] * 4, []
    for w, h in wh.tolist():
        row = []
        for aw, ah in anchors.tolist():
            inter = min(w, aw) * min(h, ah)
            row.append(inter / (w * h + aw * ah - inter))
        counts[row.index(max(row))] += 1
        ious.append(max(row))
    shares, mean_iou = engine.anchor_shares(wh, anchors)
    assert shares == pytest.approx([c / 200 for c in counts]) and shares[3] == 0
    assert mean_iou == pytest.approx(sum(ious) / 200, rel=1e-5)


def test_the_summary_compares_darknets_anchors(demo_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="yolo.kmeans"):
        assert kmeans.main(demo_args(demo_root, tmp_path, "--k", "3", "--img-size", "256")) == 0
    summary = json.loads((tmp_path / "kmeans.json").read_text())
    wh = read_voc_box_sizes(demo_root, [("demo", "train")], DEMO_CLASSES)
    shares, iou = engine.anchor_shares(wh, default_anchors() / 8)  # 256: an 8-cell grid
    assert summary["darknet_default"] == {"mean_iou": iou, "box_share": shares}
    assert sum(summary["results"][0]["box_share"]) == pytest.approx(1)
    assert f"at --img-size 256: mean IoU {100 * iou:.2f}%" in caplog.text
