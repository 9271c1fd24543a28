"""yolo.ema: the weight EMA against a plain loop, under autocast, and in the engine: best.pt
holds the average, last.pt both, resume mid-epoch is bit-exact, DDP ranks hold the same EMA."""

import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import yolo.ema
from tests.test_train import (
    REPO,
    _signal_at_batch,
    assert_same_weights,
    logged,
    make_config,
)
from utils.demo import generate_demo_dataset
from yolo.checkpoint import load_checkpoint
from yolo.config import SMALL_DATA, TrainConfig
from yolo.ema import EMA_RAMP, WeightEMA, ema_terms, ramped_decay
from yolo.train import fit


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _reference(snapshots: list[dict], decay: float, ramp: float) -> dict:
    """ema_0 = w_0; ema_k = d_k ema_(k-1) + (1 - d_k) w_k, d_k = decay (1 - exp(-k / ramp)),
    over every float tensor of the state dict (weights and BatchNorm buffers), in float64."""
    ema = {k: v.double() for k, v in snapshots[0].items()}
    for k, weights in enumerate(snapshots[1:], start=1):
        d = decay * (1 - math.exp(-k / ramp))
        for key, value in weights.items():
            if value.is_floating_point():
                ema[key] = d * ema[key] + (1 - d) * value.double()
            else:
                ema[key] = value.double()
    return ema


def _train(model, ema: WeightEMA, steps: int, autocast: bool = False) -> list[dict]:
    """SGD steps on random data; the EMA updated after each; the state dict after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    snapshots = []
    for _ in range(steps):
        images = torch.rand(2, 3, 8, 8, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(images).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snapshots


@pytest.mark.parametrize("autocast", [False, True])
def test_ema_matches_a_plain_loop_weights_and_buffers(autocast):
    torch.manual_seed(0)
    model = _net()
    ema = WeightEMA(model, decay=0.9, ramp=3.0)
    snapshots = _train(model, ema, steps=12, autocast=autocast)
    expected = _reference(snapshots, 0.9, 3.0)
    got = ema.module.state_dict()
    assert got.keys() == expected.keys() and ema.updates == 12
    for key, value in got.items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key  # float32 under autocast too
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["1.running_mean"], snapshots[-1]["1.running_mean"])  # averaged
    assert torch.equal(got["1.num_batches_tracked"], snapshots[-1]["1.num_batches_tracked"])


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    model = _net()
    straight = WeightEMA(model, decay=0.99, ramp=5.0)
    _train(model, straight, steps=4)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = WeightEMA(_net(), decay=0.99, ramp=5.0)
    resumed.load_state_dict(straight.state_dict())
    assert resumed.updates == 4 and int(resumed.averaged.n_averaged) == 4
    other = _net()
    other.load_state_dict(saved)
    _train(model, straight, steps=3)
    _train(other, resumed, steps=3)
    assert_same_weights(straight.module.state_dict(), resumed.module.state_dict())


def test_decay_and_ramp_are_bounded_by_the_run():
    assert ema_terms(0.9998, 200_000, 0.05) == (0.9998, EMA_RAMP)  # long: YOLOX's numbers
    decay, ramp = ema_terms(0.9998, 160 * 259, 0.05)  # VOC: a window of 5% of 41,440 steps
    assert ramp == EMA_RAMP and 1 / (1 - decay) == pytest.approx(2072)
    decay, ramp = ema_terms(0.9998, 60 * 20, 0.05)  # 160 photos, batch 8, 60 epochs
    assert ramp == pytest.approx(120) and 1 / (1 - decay) == pytest.approx(60)  # 3 epochs
    assert ramped_decay(0, decay, ramp) == 0.0  # the first update copies
    assert ramped_decay(1200, decay, ramp) == pytest.approx(decay, rel=1e-4)
    assert ramped_decay(1200, 0.9998, 2000) < 0.46  # YOLOX's ramp: hardly an average
    assert ema_terms(0.9998, 60 * 20, 0.1)[0] == pytest.approx(1 - 1 / 120)  # --ema-share 0.1
    assert ema_terms(0.9, 60 * 20, 0.05)[0] == 0.9  # a lower --ema-decay stays
    assert ema_terms(0.5, 10, 0.05) == (0.0, 1.0)  # a tiny run: at most the last step


def test_small_preset_uses_ema_and_voc_does_not():
    assert SMALL_DATA["ema"] is True and TrainConfig().ema is False


def _ema_config(tmp_path: Path, root: Path, **overrides) -> TrainConfig:
    return make_config(tmp_path, root, ema=True, ema_share=1.0, **overrides)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ema_demo")
    return generate_demo_dataset(root, num_train=8, num_val=2, min_size=64, max_size=96, seed=0)


def _average_the_whole_run(monkeypatch) -> None:
    """These runs are 2 to 4 steps: a tenth of them would make the EMA the weights."""
    monkeypatch.setattr(yolo.ema, "EMA_RAMP_SHARE", 1.0)


def test_best_holds_the_ema_and_last_both(tmp_path, demo_root, monkeypatch, caplog):
    _average_the_whole_run(monkeypatch)
    with caplog.at_level(logging.INFO):
        fit(_ema_config(tmp_path, demo_root, epochs=1, burn_in_share=0.1, prior_share=0.1))
    # --prior-share 0.1: the loss's prior term lasts a tenth of the run's 8 images, one batch
    assert "burn-in 1 steps (0.5 epochs); prior term for the first 1 images" in caplog.text
    assert ("weight EMA: decay 0.5, an average over about the last 2 steps (1.0 epochs), "
            "ramping up with a time constant of 2 steps" in caplog.text)  # fmt: skip
    prior = [value for _, value in logged(tmp_path / "logs/t", "train/loss_prior")]
    assert prior[0] > 0 and prior[1] == 0
    last = load_checkpoint(tmp_path / "model/t/last.pt")
    best = load_checkpoint(tmp_path / "model/t/best.pt")
    assert last["ema"]["updates"] == last["state"]["iteration"] == 2
    assert best["state"]["best_epoch"] == 1 and "ema" not in best
    assert_same_weights(best["model"], last["ema"]["model"])
    assert not torch.equal(best["model"]["head.conv.weight"], last["model"]["head.conv.weight"])


def test_resume_mid_epoch_with_ema_is_exact(tmp_path, demo_root, monkeypatch):
    _average_the_whole_run(monkeypatch)
    straight = tmp_path / "straight"
    fit(_ema_config(straight, demo_root))
    config = _ema_config(tmp_path / "cut", demo_root)
    _signal_at_batch(monkeypatch, batch=3, signum=signal.SIGHUP)
    assert fit(config)["interrupted"]
    monkeypatch.undo()
    _average_the_whole_run(monkeypatch)
    fit(dataclasses.replace(config, resume="last"))
    ours = load_checkpoint(tmp_path / "cut/model/t/last.pt")
    theirs = load_checkpoint(straight / "model/t/last.pt")
    assert_same_weights(ours["model"], theirs["model"])
    assert_same_weights(ours["ema"]["model"], theirs["ema"]["model"])
    assert ours["ema"]["updates"] == theirs["ema"]["updates"] == 4
    assert not torch.equal(
        ours["ema"]["model"]["head.conv.weight"], ours["model"]["head.conv.weight"]
    )


DDP_DRIVER = """
import sys
from pathlib import Path
import torch
import yolo.ema
import yolo.train
from tests.test_train import make_config
save = yolo.train.save
def save_every_rank(run, state, name):
    save(run, state, name)
    torch.save(run.ema.state_dict(), Path(sys.argv[1]) / f"ema{run.runtime.rank}.pt")
yolo.train.save = save_every_rank
yolo.ema.EMA_RAMP_SHARE = 1.0  # 2 steps: average them
config = make_config(Path(sys.argv[1]), Path(sys.argv[2]), epochs=1, batch_size=2, ema=True,
                     ema_share=1.0)
yolo.train.fit(config)
"""


def test_ddp_ranks_hold_the_same_ema(tmp_path, demo_root):
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(driver), str(tmp_path), str(demo_root)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"ema{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["updates"] == rank1["updates"] == 2
    assert_same_weights(rank0["model"], rank1["model"])
    last = load_checkpoint(tmp_path / "model/t/last.pt")
    assert_same_weights(last["ema"]["model"], rank0["model"])
    assert not torch.equal(
        last["ema"]["model"]["head.conv.weight"], last["model"]["head.conv.weight"]
    )
