import json

import pytest
import torch

from yolo.config import TestConfig, TrainConfig
from yolo.flags import (
    build_parser,
    config_from_dict,
    config_to_dict,
    parse_args,
    parse_config,
    save_config_json,
)
from yolo.load import resolve_anchors
from yolo.train import run_anchors
from yolo.weights import DARKNET_RELEASES


def test_every_field_is_a_kebab_case_flag():
    help_text = build_parser(TrainConfig()).format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in help_text


def test_flags_override_the_preset_and_keep_the_rest():
    preset = TrainConfig(model="resnet18", run="r18", pretrained="default")
    config = parse_config(
        preset,
        [
            "--epochs",
            "3",
            "--no-multi-scale",
            "--train-sets",
            "2007:trainval",
            "2012:train",
            "--lr-steps",
            "1",
            "2",
            "--lr",
            "0.01",
            "--classes",
            "c.txt",
        ],
    )
    assert config.epochs == 3 and config.multi_scale is False and config.lr == 0.01
    assert config.train_sets == ("2007:trainval", "2012:train") and config.lr_steps == (1, 2)
    assert config.classes == "c.txt" and config.model == "resnet18" and config.run == "r18"
    assert config.pretrained == "default"


def test_optional_value_flags():
    preset = TrainConfig(model="resnet18", pretrained="default")
    assert parse_config(preset, ["--no-pretrained"]).pretrained is None
    assert parse_config(preset, ["--pretrained", "r18.pth"]).pretrained == "r18.pth"
    assert parse_config(TrainConfig(), ["--resume"]).resume == "last"
    assert parse_config(TrainConfig(), ["--resume", "x.pt"]).resume == "x.pt"
    assert parse_config(TrainConfig(), []).resume is None


def test_run_name_alias_for_torchrun():
    assert parse_config(TrainConfig(), ["--run-name", "r"]).run == "r"
    assert parse_config(TrainConfig(), ["--run", "r"]).run == "r"


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig(), ["--epoch", "3"])
    assert info.value.code == 2
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--img-size", "400"], "multiple of 32"),
        (["--val-set", "2007"], "NAME:SPLIT"),
        (["--accum", "0"], "at least 1"),
        (["--model", "resnet18", "--darknet-weights", "x.weights"], "darknet model"),
    ],
)
def test_invalid_values_fail_with_the_flag_named(argv, message):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig(), argv)
    assert message in str(info.value)


def test_enumerated_flags_list_their_choices(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig(), ["--model", "vgg16"])
    assert info.value.code == 2
    assert "invalid choice: 'vgg16' (choose from 'darknet19', 'tiny'" in capsys.readouterr().err
    help_text = build_parser(TrainConfig()).format_help()
    assert "{sgd,adamw}" in help_text and "{global,darknet}" in help_text


def test_help_shows_each_default_once_as_typed():
    help_text = " ".join(build_parser(TrainConfig()).format_help().split())
    assert "(default: 2007:trainval 2012:trainval)" in help_text
    assert "(default: 60 90)" in help_text and "(default: --multi-scale)" in help_text
    assert "default: VOC's 20)" in help_text and "VOC's 20) (default" not in help_text
    assert "('2007:trainval'" not in help_text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nms-threshold", "1.5"], "an IoU in [0, 1]"),
        (["--conf-threshold", "-0.1"], "a score in [0, 1)"),
        (["--lr", "inf"], "a positive number"),
        (["--lr", "nan"], "a positive number"),
        (["--run", ""], "--run ''"),
        (["--run", "../x"], "--run '../x'"),
        (["--min-size", "224", "--max-size", "300"], "--max-size 300: use a multiple of 32"),
        (["--weights", "a.pt", "--resume"], "--weights and --resume together"),
    ],
)
def test_values_are_checked_before_any_work(argv, message):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig(), argv)
    assert message in str(info.value)


def test_parse_args_says_which_flags_were_given():
    config, given = parse_args(TrainConfig(), ["--epochs", "160", "--no-amp", "--debug"])
    assert given == {"epochs", "amp", "debug"} and config.epochs == 160 and not config.amp


def test_round_trip_through_json(tmp_path):
    config = parse_config(TrainConfig(), ["--lr-steps", "5", "7", "--anchors", "a.json"])
    path = tmp_path / "config.json"
    save_config_json(config, path)
    data = json.loads(path.read_text())
    assert data["lr_steps"] == [5, 7]
    assert config_from_dict(TrainConfig, data) == config
    assert config_from_dict(TestConfig, config_to_dict(TestConfig())) == TestConfig()
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict(TrainConfig, {**data, "bogus": 1})
    # a checkpoint from before --ema-share averaged over a tenth of the run: it resumes so
    older = {k: v for k, v in data.items() if k != "ema_share"}
    assert config_from_dict(TrainConfig, older).ema_share == 0.1 != TrainConfig().ema_share
    assert config_from_dict(TrainConfig, {**older, "ema_share": 0.05}).ema_share == 0.05


def test_preset_small_sets_its_values_and_flags_given_win():
    config, given = parse_args(TrainConfig(), ["--preset", "small", "--epochs", "12"])
    assert config.model == "tiny" and config.optimizer == "adamw" and not config.multi_scale
    assert config.lr_steps == (45, 55) and config.img_size == 256
    assert config.epochs == 12 and given == {"epochs"}  # the flag given over the preset's 60
    explicit = ["--model", "tiny", "--img-size", "256", "--eval-img-size", "256",
                "--no-multi-scale", "--optimizer", "adamw", "--lr", "1e-3", "--batch-size", "8",
                "--accum", "1", "--epochs", "60", "--lr-steps", "45", "55", "--ema"]  # fmt: skip
    assert parse_config(TrainConfig(), ["--preset", "small"]) == parse_config(
        TrainConfig(), explicit
    )
    with pytest.raises(SystemExit):
        parse_config(TrainConfig(), ["--preset", "huge"])


def test_preset_coco_is_darknets_yolov2_cfg():
    config = parse_config(TrainConfig(), ["--preset", "coco", "--data", "coco/annotations"])
    assert config.model == "darknet19" and config.anchors == "yolov2"
    assert config.eval_img_size == 608 and (config.min_size, config.max_size) == (320, 608)
    steps_per_epoch = 118_287 / (config.batch_size * config.accum)  # train2017, 64 a step
    assert round(500_200 / steps_per_epoch) == config.epochs  # darknet's max_batches
    assert [round(s / steps_per_epoch) for s in (400_000, 450_000)] == list(config.lr_steps)
    for anchors in (resolve_anchors(config.anchors), run_anchors(config, say=True)):
        assert torch.equal(anchors, torch.tensor(DARKNET_RELEASES["yolov2"].anchors))
