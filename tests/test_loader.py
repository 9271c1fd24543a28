"""utils.loader: the seeded sampler, collate (padding, centre form, metas), the DataLoader."""

from __future__ import annotations

import pytest
import torch

from utils.data import VOCDataset
from utils.demo import DEMO_CLASSES
from utils.loader import SeededSampler, build_dataloader, collate_detection
from utils.transforms import build_eval_transform, build_train_transform


def _epoch(sampler: SeededSampler, epoch: int, start: int = 0) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch, start)
    pairs = list(sampler)
    assert len(pairs) == len(sampler)
    return pairs


def test_sampler_is_a_seeded_permutation():
    sampler = SeededSampler(50, shuffle=True, seed=3)
    epoch0 = _epoch(sampler, 0)
    assert sorted(index for index, _ in epoch0) == list(range(50))
    assert epoch0 == _epoch(SeededSampler(50, shuffle=True, seed=3), 0)
    assert [i for i, _ in epoch0] != [i for i, _ in _epoch(sampler, 1)]
    assert [i for i, _ in epoch0] != [
        i for i, _ in _epoch(SeededSampler(50, shuffle=True, seed=4), 0)
    ]
    assert len({seed for _, seed in epoch0}) == 50
    ordered = _epoch(SeededSampler(7, shuffle=False, seed=0), 2)
    assert [index for index, _ in ordered] == list(range(7))


def test_item_seed_depends_on_seed_epoch_index_only():
    seeds_a = dict(_epoch(SeededSampler(30, shuffle=True, seed=1), 4))
    seeds_b = dict(_epoch(SeededSampler(30, shuffle=False, seed=1), 4))
    assert seeds_a == seeds_b
    assert seeds_a != dict(_epoch(SeededSampler(30, shuffle=False, seed=1), 5))


@pytest.mark.parametrize(
    ("length", "replicas", "drop_last"),
    [(10, 3, False), (10, 3, True), (9, 3, False), (2, 4, False)],
)
def test_sampler_shards_like_distributed_sampler(length, replicas, drop_last):
    shards = [
        [
            index
            for index, _ in _epoch(
                SeededSampler(
                    length,
                    shuffle=True,
                    seed=0,
                    num_replicas=replicas,
                    rank=rank,
                    drop_last=drop_last,
                ),
                1,
            )
        ]
        for rank in range(replicas)
    ]
    per_rank = length // replicas if drop_last else -(-length // replicas)
    assert all(len(shard) == per_rank for shard in shards)
    seen = [index for shard in shards for index in shard]
    if drop_last:
        assert len(set(seen)) == len(seen)
    else:
        assert set(seen) == set(range(length))
    reference = torch.utils.data.DistributedSampler(
        range(length), num_replicas=replicas, rank=0, shuffle=False, drop_last=drop_last
    )
    unshuffled = SeededSampler(
        length, shuffle=False, seed=0, num_replicas=replicas, drop_last=drop_last
    )
    assert [index for index, _ in unshuffled] == list(reference)


def test_sampler_start_resumes_mid_epoch():
    sampler = SeededSampler(20, shuffle=True, seed=9, num_replicas=2, rank=1)
    full = _epoch(sampler, 3)
    assert _epoch(sampler, 3, start=4) == full[4:]
    assert _epoch(sampler, 3, start=10) == []
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(3, start=11)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        SeededSampler(10, shuffle=True, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="positive"):
        SeededSampler(0, shuffle=True, seed=0)


# ------------------------------------------------------------------------------ collate, loader


def _target(boxes, labels, difficult=None, image_id="x"):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.int64)
    difficult = torch.zeros(len(labels), dtype=torch.bool) if difficult is None else difficult
    return {
        "boxes": boxes,
        "labels": labels,
        "difficult": difficult,
        "image_id": image_id,
        "orig_size": (10, 20),
    }


def test_collate_pads_and_converts_to_centre_form():
    batch = [
        (torch.rand(3, 32, 32), _target([[0.1, 0.2, 0.5, 0.6]], [3], torch.tensor([True]), "a")),
        (torch.rand(3, 32, 32), _target([[0, 0, 1, 1], [0.5, 0.5, 0.75, 1.0]], [0, 1], None, "b")),
        (torch.rand(3, 32, 32), _target([], [], None, "c")),
    ]
    images, targets, metas = collate_detection(batch)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert targets.shape == (3, 2, 5) and targets.dtype == torch.float32
    torch.testing.assert_close(targets[0, 0], torch.tensor([3.0, 0.3, 0.4, 0.4, 0.4]))
    torch.testing.assert_close(targets[0, 1], torch.tensor([-1.0, 0, 0, 0, 0]))
    torch.testing.assert_close(targets[1, 1], torch.tensor([1.0, 0.625, 0.75, 0.25, 0.5]))
    assert (targets[2, :, 0] == -1).all()
    assert [meta["image_id"] for meta in metas] == ["a", "b", "c"]
    torch.testing.assert_close(metas[0]["gt"], torch.tensor([[0.1, 0.2, 0.5, 0.6, 3.0, 1.0]]))
    assert metas[1]["gt"].shape == (2, 6) and metas[2]["gt"].shape == (0, 6)
    assert metas[0]["orig_size"] == (10, 20)
    assert not any(meta["unreadable"] for meta in metas)


def test_collate_passes_the_unreadable_flag_into_the_metas():
    flagged = {**_target([[0.1, 0.1, 0.2, 0.2]], [1], None, "gone"), "unreadable": True}
    plain = _target([], [], None, "ok")  # a target without the key reads as readable
    _, _, metas = collate_detection([(torch.rand(3, 8, 8), flagged), (torch.rand(3, 8, 8), plain)])
    assert [meta["unreadable"] for meta in metas] == [True, False]
    assert metas[0]["gt"].shape == (1, 6)  # its ground truth stays, to be counted as missed


def test_collate_all_empty_has_one_padding_row():
    _, targets, _ = collate_detection([(torch.rand(3, 8, 8), _target([], []))])
    assert targets.shape == (1, 1, 5) and targets[0, 0, 0] == -1


def test_build_dataloader_is_deterministic_across_worker_counts(demo_root, two_torch_threads):
    # a worker runs on one thread; at 128 pixels F.interpolate splits its work over two threads
    # in the main process and rounds some last bits otherwise: the loader must not let it show
    ds = VOCDataset(
        demo_root, [("demo", "train")], DEMO_CLASSES, transform=build_train_transform(128)
    )

    def run(workers):
        loader = build_dataloader(ds, batch_size=5, shuffle=True, seed=1, workers=workers)
        assert isinstance(loader.sampler, SeededSampler) and not loader.pin_memory
        loader.sampler.set_epoch(2, start=3)
        return [(images, targets) for images, targets, _ in loader]

    serial, parallel = run(0), run(2)
    assert torch.get_num_threads() == 2  # the main process's own count, restored
    assert [len(images) for images, _ in serial] == [5, 5, 5, 5, 1]  # 24 - 3 items
    for (images_a, targets_a), (images_b, targets_b) in zip(serial, parallel, strict=True):
        torch.testing.assert_close(images_a, images_b, rtol=0, atol=0)
        torch.testing.assert_close(targets_a, targets_b, rtol=0, atol=0)


def test_build_dataloader_drop_last_and_shards(demo_root):
    ds = VOCDataset(
        demo_root, [("demo", "train")], DEMO_CLASSES, transform=build_eval_transform(32)
    )
    loader = build_dataloader(
        ds, batch_size=5, shuffle=False, seed=0, workers=0, drop_last=True, num_replicas=2, rank=1
    )
    assert len(loader) == 2
    ids = [meta["image_id"] for _, _, metas in loader for meta in metas]
    assert ids == [f"{index:06d}" for index in range(1, 20, 2)]


def test_workers_are_capped_at_the_usable_cpus(monkeypatch):
    import utils.loader

    dataset = list(range(6))
    monkeypatch.setattr(utils.loader, "usable_cpus", lambda: 2)
    for asked, made in ((0, 0), (1, 1), (2, 2), (4, 2), (16, 2)):
        loader = build_dataloader(dataset, batch_size=2, shuffle=False, seed=0, workers=asked)
        assert loader.num_workers == made
