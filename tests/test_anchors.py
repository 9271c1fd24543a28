"""Anchors: defaults, JSON files, box sizes from VOC XML, and k-means against a plain Lloyd loop."""

import json
import logging

import pytest
import torch

from utils.anchors import (
    DARKNET_VOC_ANCHORS_GRID,
    default_anchors,
    load_anchors,
    read_voc_box_sizes,
    save_anchors,
)
from utils.boxes import wh_iou
from utils.data import VOCDataset
from utils.kmeans import (
    _check_box_sizes,
    _distinct_shapes,
    _iou_np,
    _kmeanspp_init,
    _lloyd,
    _nearest_two,
    run_kmeans,
)

PLANTED = torch.tensor([[0.05, 0.08], [0.2, 0.45], [0.5, 0.3], [0.85, 0.9]])  # by area


def planted_boxes(per_cluster: int = 300, spread: float = 0.03, seed: int = 0) -> torch.Tensor:
    """Boxes ``[4 * per_cluster, 2]`` scattered tightly (log-normal) around :data:`PLANTED`."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.exp(spread * torch.randn(len(PLANTED), per_cluster, 2, generator=generator))
    return (PLANTED[:, None] * noise).reshape(-1, 2).clamp(max=1.0)  # [4, n, 2] -> [4n, 2]


def plain_lloyd(wh: torch.Tensor, centres: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, int]:
    """Reference Lloyd loop for one restart, ``centres`` ``[k, 2]``: every box against every
    centre each iteration (no bounds), means in float64, empty clusters re-seeded with the
    distinct box shapes farthest from their centres. Returns the final centres and the number
    of updates."""
    k = len(centres)
    assign = wh_iou(wh[:, None], centres[None]).argmax(dim=1)  # [M]: first maximum on ties
    for iteration in range(1, max_iter + 1):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros(k, 2, dtype=torch.float64).index_add_(0, assign, wh.double())
        new_centres = (sums / counts.clamp(min=1)[:, None]).float()
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            distance = 1 - wh_iou(wh, centres[assign])  # [M] to each box's own centre
            chosen: list[torch.Tensor] = []  # distinct shapes, farthest first, ties by index
            for index in torch.argsort(distance, descending=True, stable=True).tolist():
                if len(chosen) < len(empty) and not any(torch.equal(wh[index], c) for c in chosen):
                    chosen.append(wh[index])
            new_centres[empty] = torch.stack(chosen)
        centres = new_centres
        new_assign = wh_iou(wh[:, None], centres[None]).argmax(dim=1)
        if torch.equal(new_assign, assign):
            return centres, iteration
        assign = new_assign
    return centres, max_iter


def random_box_sizes(generator: torch.Generator, num_boxes: int, quantise: bool) -> torch.Tensor:
    wh = torch.rand(num_boxes, 2, generator=generator) * 0.98 + 0.02
    return (wh * 20).ceil() / 20 if quantise else wh  # quantised: many duplicates and IoU ties


# ---------------------------------------------------------------------------------------------
# k-means


def test_recovers_planted_clusters():
    wh = planted_boxes()
    result = run_kmeans(wh, 4, restarts=5, seed=0)
    torch.testing.assert_close(result.anchors, PLANTED, rtol=0.02, atol=0)
    assert result.mean_iou > 0.93
    assert result.anchors.dtype == torch.float32 and result.anchors.shape == (4, 2)
    assert result.iterations.shape == (5,) and result.restart_ious.shape == (5,)
    assert result.mean_iou == pytest.approx(float(result.restart_ious.max()))
    areas = result.anchors.prod(dim=1)
    assert torch.all(areas[1:] >= areas[:-1])


def test_mean_iou_is_the_mean_best_iou_of_the_boxes():
    wh = planted_boxes(per_cluster=50, spread=0.2, seed=1)
    result = run_kmeans(wh, 3, restarts=3, seed=2)
    expected = wh_iou(wh[:, None], result.anchors[None]).amax(dim=1).mean()
    assert result.mean_iou == pytest.approx(float(expected), abs=1e-6)


def test_deterministic_for_a_seed():
    wh = planted_boxes(per_cluster=100, spread=0.3)
    first, again = run_kmeans(wh, 5, restarts=4, seed=7), run_kmeans(wh, 5, restarts=4, seed=7)
    assert torch.equal(first.anchors, again.anchors)
    assert torch.equal(first.iterations, again.iterations)
    assert torch.equal(first.restart_ious, again.restart_ious)
    boxes = _check_box_sizes(wh, 5, 4, 300)
    init_a = _kmeanspp_init(boxes, 5, 4, torch.Generator().manual_seed(7))
    init_b = _kmeanspp_init(boxes, 5, 4, torch.Generator().manual_seed(8))
    assert not torch.equal(init_a, init_b)


@pytest.mark.parametrize("trial", range(6))
def test_lloyd_equals_a_plain_lloyd_loop(trial):
    generator = torch.Generator().manual_seed(trial)
    num_boxes = int(torch.randint(30, 1500, (1,), generator=generator))
    k = int(torch.randint(2, 9, (1,), generator=generator))
    wh = random_box_sizes(generator, num_boxes, quantise=trial % 2 == 1)
    boxes = _check_box_sizes(wh, k, 3, 300)
    centres = _kmeanspp_init(boxes, k, 3, generator)  # [3, k, 2]
    centres[2, -1] = centres[2, 0]  # a duplicate centre: its cluster starts empty
    centres[1, 1:] = centres[1, 0]  # k - 1 clusters start empty: distinct shapes re-seed them
    final, iterations = _lloyd(_distinct_shapes(boxes), centres, max_iter=300)
    for restart in range(3):
        expected, expected_iterations = plain_lloyd(wh, centres[restart], 300)
        assert torch.equal(final[restart], expected)
        assert int(iterations[restart]) == expected_iterations
        nearest, _, assign, *_ = _nearest_two(boxes.numpy(), final[restart, None].numpy())
        best_iou, expected_assign = wh_iou(wh[:, None], expected[None]).max(dim=1)
        assert torch.equal(torch.from_numpy(assign), expected_assign)
        torch.testing.assert_close(torch.from_numpy(1 - nearest), best_iou, rtol=0, atol=1e-6)


def test_lloyd_stops_at_max_iter():
    wh = random_box_sizes(torch.Generator().manual_seed(0), 500, quantise=False)
    boxes = _check_box_sizes(wh, 6, 2, 2)
    centres = _kmeanspp_init(boxes, 6, 2, torch.Generator().manual_seed(0))
    final, iterations = _lloyd(_distinct_shapes(boxes), centres, max_iter=2)
    assert iterations.tolist() == [2, 2]
    for restart in range(2):
        assert torch.equal(final[restart], plain_lloyd(wh, centres[restart], 2)[0])


def test_iou_and_nearest_two_match_wh_iou():
    generator = torch.Generator().manual_seed(0)
    wh = random_box_sizes(generator, 3000, quantise=True)
    centres = random_box_sizes(generator, 12, quantise=True).view(2, 6, 2)  # ties on purpose
    boxes = _check_box_sizes(wh, 1, 1, 1)
    expected = wh_iou(wh[None, None], centres[:, :, None])  # [2, 6, M]
    table = torch.stack([centres[..., 0], centres[..., 1], centres.prod(dim=-1)])  # [3, 2, 6]
    iou_np = _iou_np(boxes[:, None, None].numpy(), table[..., None].numpy())  # [2, 6, M]
    assert torch.equal(torch.from_numpy(iou_np), expected)
    found = _nearest_two(boxes.numpy(), centres.numpy(), chunk_size=700)  # [2*M] each
    nearest, second, index = (torch.from_numpy(a).view(2, -1) for a in found[:3])  # [2, M]
    best_iou, best = expected.max(dim=1)  # [2, M]
    assert torch.equal(index, best) and torch.equal(nearest, 1 - best_iou)
    top_two = expected.topk(2, dim=1).values  # [2, 2, M]
    assert torch.equal(second, 1 - top_two[:, 1])
    assert found[3].tolist() == [0] * 3000 + [1] * 3000 and found[4].tolist() == [*range(3000)] * 2
    one_centre = _nearest_two(boxes.numpy(), centres[:, :1].numpy())  # k = 1
    assert (one_centre[1] == 1).all() and (one_centre[2] == 0).all()


def test_nearest_two_of_some_pairs_in_chunks():
    generator = torch.Generator().manual_seed(1)
    boxes = _check_box_sizes(random_box_sizes(generator, 1000, quantise=True), 1, 1, 1).numpy()
    centres = random_box_sizes(generator, 21, quantise=True).view(3, 7, 2).numpy()
    every_pair = _nearest_two(boxes, centres)  # [3000] each
    flat = torch.randperm(3000, generator=generator)[:900].sort().values.numpy()  # [900]
    some_pairs = _nearest_two(boxes, centres, flat, chunk_size=128)
    for found, expected in zip(some_pairs, every_pair, strict=True):
        assert (found == expected[flat]).all()


def test_distinct_shapes_regroup_the_boxes():
    wh = random_box_sizes(torch.Generator().manual_seed(0), 2000, quantise=True)
    boxes = _check_box_sizes(wh, 1, 1, 1)
    shapes = _distinct_shapes(boxes)
    assert shapes.boxes.shape[1] == torch.unique(wh, dim=0).shape[0] < 2000
    assert torch.equal(torch.from_numpy(shapes.boxes[:, shapes.inverse]), boxes)
    assert shapes.counts.sum() == 2000
    assert torch.equal(
        torch.from_numpy(shapes.counts), torch.bincount(torch.from_numpy(shapes.inverse)).double()
    )


def test_kmeanspp_draws_with_probability_of_squared_distance():
    wh = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.4, 0.4]])
    boxes = _check_box_sizes(wh, 2, 1, 1)
    centres = _kmeanspp_init(boxes, 2, 30_000, torch.Generator().manual_seed(0))  # [R, 2, 2]
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


# ---------------------------------------------------------------------------------------------
# defaults and JSON files


def test_default_anchors_are_darknets_voc_set_over_13():
    anchors = default_anchors()
    assert anchors.shape == (5, 2) and anchors.dtype == torch.float32
    torch.testing.assert_close(anchors * 13, torch.tensor(DARKNET_VOC_ANCHORS_GRID))
    assert bool(((anchors > 0) & (anchors <= 1)).all())


def test_save_then_load_round_trip(tmp_path):
    anchors = torch.rand(7, 2) * 0.9 + 0.05
    path = tmp_path / "sub" / "anchors.json"
    save_anchors(anchors, path)
    assert torch.equal(load_anchors(path), anchors)
    entries = json.loads(path.read_text())
    assert entries[0] == {"width": float(anchors[0, 0]), "height": float(anchors[0, 1])}
    assert [p.name for p in path.parent.iterdir()] == ["anchors.json"]  # no temp file left


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[{'width': 0.1}", "not valid JSON"),
        ('{"width": 0.1, "height": 0.2}', "expected a non-empty list"),
        ("[]", "expected a non-empty list"),
        ('[{"width": 0.1}]', "entry 0 .* exactly the keys"),
        ('[{"width": 0.1, "height": 0.2, "depth": 1}]', "exactly the keys"),
        ('[{"width": 0.1, "height": 0.2}, {"width": 1.3221, "height": 1.7}]', "entry 1: width"),
        ('[{"width": 0, "height": 0.2}]', r"not a fraction of the image in \(0, 1\]"),
        ('[{"width": 0.5, "height": -0.2}]', "height = -0.2"),
        ('[{"width": true, "height": 0.2}]', "width = True"),
        ('[{"width": "0.5", "height": 0.2}]', "width = '0.5'"),
    ],
)
def test_bad_anchor_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_anchors(path)
    assert str(path) in str(info.value)


def test_missing_anchor_file_and_bad_anchors_to_save(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none\.json does not exist"):
        load_anchors(tmp_path / "none.json")
    with pytest.raises(ValueError, match="shape"):
        save_anchors(torch.rand(5), tmp_path / "a.json")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        save_anchors(default_anchors() * 13, tmp_path / "a.json")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# box sizes from VOC XML


def test_read_voc_box_sizes_skips_difficult_and_degenerate(voc_writer, caplog):
    voc_writer.add(
        "a",
        [
            ("cat", (1, 1, 33, 25), 0),  # 32x24 of 64x48
            ("dog", (10, 10, 26, 46), 1),  # difficult
            ("cat", (5, 5, 5, 20), 0),  # zero width: dropped with a warning
        ],
    )
    voc_writer.add("b", [("dog", (1, 1, 80, 13), None)])  # wider than the image: clamped
    sets = voc_writer.write_set("trainval")
    with caplog.at_level(logging.WARNING):
        sizes = read_voc_box_sizes(voc_writer.root, sets, ["cat", "dog"])
    assert torch.equal(sizes, torch.tensor([[0.5, 0.5], [1.0, 0.25]]))
    assert "zero-area box" in caplog.text and "a.xml" in caplog.text
    with_difficult = read_voc_box_sizes(voc_writer.root, sets, ["cat", "dog"], keep_difficult=True)
    torch.testing.assert_close(with_difficult[1], torch.tensor([0.25, 0.75]))
    assert len(with_difficult) == 3


def test_read_voc_box_sizes_are_the_training_targets(voc_writer):
    # the image header's size wins over <size>, as in training; (w, h) = x2 - x1 of the
    # float32 normalised targets, bit for bit
    voc_writer.add("a", [("cat", (1, 1, 33, 25), 0)], xml_size=(48, 64))  # <size> is wrong
    voc_writer.add("b", [("dog", (-5, 20, 50, 99), 0), ("cat", (3, 4, 60, 40), 1)], xml_size=None)
    voc_writer.add("c", [("dog", (10, 2, 41, 47), 0)], size=(80, 60))
    sets = voc_writer.write_set("trainval")
    sizes = read_voc_box_sizes(voc_writer.root, sets, ["cat", "dog"])
    assert torch.equal(sizes[0], torch.tensor([0.5, 0.5]))
    for keep_difficult in (False, True):
        dataset = VOCDataset(voc_writer.root, sets, ["cat", "dog"], keep_difficult=keep_difficult)
        targets = [dataset.get_target(i)["boxes"] for i in range(len(dataset))]  # [G, 4] each
        expected = torch.cat([t[:, 2:] - t[:, :2] for t in targets])
        sizes = read_voc_box_sizes(
            voc_writer.root, sets, ["cat", "dog"], keep_difficult=keep_difficult
        )
        assert torch.equal(sizes, expected)
    assert len(sizes) == 4


def test_read_voc_box_sizes_skip_bad_files_and_unknown_classes(voc_writer, caplog):
    voc_writer.add("good", [("cat", (1, 1, 33, 25), 0), ("zebra", (1, 1, 10, 10), 0)])
    voc_writer.image("broken")
    voc_writer.raw_annotation("broken", "<annotation><object><name>cat</name>")
    voc_writer.add("nan", [("cat", (1, "x", 10, 10), 0)])
    voc_writer.annotation("noimage", [("cat", (1, 1, 10, 10), 0)])
    voc_writer.image("ghost")
    sets = voc_writer.write_set("trainval", ids=["good", "broken", "nan", "noimage", "ghost"])
    with caplog.at_level(logging.WARNING):
        sizes = read_voc_box_sizes(voc_writer.root, sets, ["cat"])
    assert torch.equal(sizes, torch.tensor([[0.5, 0.5]]))
    for name, reason in [
        ("good.xml", "unknown class 'zebra'"),
        ("broken.xml", "malformed XML"),
        ("nan.xml", "bad coordinates"),
        ("noimage.jpg", "missing image"),
        ("ghost.xml", "missing annotation"),
    ]:
        assert any(name in line and reason in line for line in caplog.messages), name
    assert "{'zebra': 1}" in caplog.text
    with pytest.raises(ValueError, match=r"class 'zebra', which is not in the class list"):
        read_voc_box_sizes(voc_writer.root, sets, ["cat"], strict=True)


def test_read_voc_box_sizes_errors(voc_writer):
    with pytest.raises(FileNotFoundError, match="check --data-root"):
        read_voc_box_sizes(voc_writer.root, [("test", "val")], ["zebra"])
    voc_writer.add("c", [])  # background only
    voc_writer.add("d", [("zebra", (1, 1, 10, 10), 0)])
    voc_writer.write_set("empty", ids=["c", "d"])
    with pytest.raises(ValueError, match="no boxes found"):
        read_voc_box_sizes(voc_writer.root, [("test", "empty")], ["cat"])
