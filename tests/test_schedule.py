"""yolo.schedule: darknet's burn-in and steps, capped for small datasets; multi-scale sizes."""

import pytest

from yolo.config import TrainConfig
from yolo.schedule import build_schedule, learning_rate, multiscale_sizes, train_size


def test_learning_rate_follows_darknet_burn_in_and_steps():
    kwargs = {"burn_in": 1000, "lr_steps": (60, 90), "gamma": 0.1}
    assert learning_rate(1e-3, iteration=0, epoch=0, **kwargs) == 0.0
    assert learning_rate(1e-3, iteration=500, epoch=0, **kwargs) == pytest.approx(1e-3 / 16)
    assert learning_rate(1e-3, iteration=1000, epoch=0, **kwargs) == pytest.approx(1e-3)
    assert learning_rate(1e-3, iteration=5000, epoch=59, **kwargs) == pytest.approx(1e-3)
    assert learning_rate(1e-3, iteration=5000, epoch=60, **kwargs) == pytest.approx(1e-4)
    assert learning_rate(1e-3, iteration=9000, epoch=90, **kwargs) == pytest.approx(1e-5)


def test_voc_keeps_darknets_burn_in_and_a_small_set_gets_a_few_epochs():
    config = TrainConfig()
    voc = build_schedule(config, steps_per_epoch=259)  # 16,551 images / 64
    assert voc.burn_in == 1000 and voc.low_lr_share() < 0.5
    small = build_schedule(config, steps_per_epoch=3)  # 160 photos / 64
    assert small.burn_in == 12
    assert small.lr_at(12, 0) == pytest.approx(1e-3) and small.low_lr_share() < 0.5
    # darknet's 1000 steps uncapped would keep the lr below 10% for all of a small run
    uncapped = build_schedule(
        TrainConfig(burn_in_epochs=1000, burn_in_share=1.0), steps_per_epoch=5
    )
    assert uncapped.burn_in == 800 and uncapped.low_lr_share() > 0.5  # the whole run
    assert uncapped.lr_at(5 * 160 - 1, 159) < 0.01 * 1e-3


def test_burn_in_share_bounds_a_short_runs_burn_in_when_asked():
    # 131 photos in batches of 8 (17 steps) for 25 epochs: 425 steps; 4 epochs would be 68
    assert build_schedule(TrainConfig(epochs=25), steps_per_epoch=17).burn_in == 68  # default
    short = build_schedule(TrainConfig(epochs=25, burn_in_share=0.1), steps_per_epoch=17)
    assert short.burn_in == 43  # ceil(0.1 * 425)
    assert short.lr_at(42, 2) < 1e-3 and short.lr_at(43, 2) == pytest.approx(1e-3)
    config = TrainConfig(epochs=60, burn_in_share=0.1)
    assert build_schedule(config, steps_per_epoch=17).burn_in == 68  # 4 epochs
    tiny = TrainConfig(epochs=1, burn_in_share=0.1)
    assert build_schedule(tiny, steps_per_epoch=2).burn_in == 1  # never 0
    half = build_schedule(TrainConfig(epochs=25, burn_in_share=0.5), steps_per_epoch=17)
    assert half.burn_in == 68


@pytest.mark.parametrize(
    ("epochs", "images", "share", "expected"),
    [
        (160, 16551, 0.1, 12800),  # VOC: darknet's 12800 images
        (25, 131, 0.1, 328),  # a small set: ceil(0.1 * 3275) images, 2.5 epochs
        (25, 131, 1.0, 3275),  # the whole run
        (1000, 131, 0.1, 12800),
    ],
)
def test_the_prior_term_lasts_darknets_12800_images_or_a_share_of_a_short_run(
    epochs, images, share, expected
):
    config = TrainConfig(epochs=epochs, prior_share=share)
    assert build_schedule(config, 3, images_per_epoch=images).prior_images == expected
    assert build_schedule(config, 3).prior_images == 12800  # images unknown: darknet's
    assert build_schedule(TrainConfig(prior_images=100), 3, 131).prior_images == 100
    assert build_schedule(TrainConfig(epochs=25), 3, 131).prior_images == 3275  # default: no bound


def test_share_flags_are_checked():
    for bad in ({"burn_in_share": 0.0}, {"prior_share": 1.5}, {"ema_decay": 1.0},
                {"prior_images": -1}, {"burn_in_share": float("nan")}, {"ema_share": 0.0},
                {"ema_share": 2.0}):  # fmt: skip
        with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
            TrainConfig(**bad)


def test_describe_names_steps_burn_in_and_the_learning_rates():
    config = TrainConfig(prior_share=0.1)
    text = build_schedule(config, steps_per_epoch=3, images_per_epoch=160).describe()
    assert "160 epochs of 3 optimizer steps" in text and "burn-in 12 steps (4.0 epochs)" in text
    assert "prior term for the first 2560 images" in text  # 0.1 * 160 * 160
    assert "0.0001 at epoch 60" in text and "1e-05 at epoch 90" in text


def test_multiscale_sizes_follow_min_and_max_size():
    assert multiscale_sizes(TrainConfig()) == tuple(range(320, 609, 32))
    assert multiscale_sizes(TrainConfig(min_size=224, max_size=288)) == (224, 256, 288)
    assert multiscale_sizes(TrainConfig(max_size=704))[-1] == 704
    assert multiscale_sizes(TrainConfig(multi_scale=False, img_size=256)) == (256,)
    sizes = (224, 256, 288)
    drawn = {train_size(b, seed=0, sizes=sizes, every=10) for b in range(0, 2000, 10)}
    assert drawn == set(sizes)
    assert train_size(3, seed=0, sizes=sizes, every=10) == train_size(
        9, seed=0, sizes=sizes, every=10
    )
