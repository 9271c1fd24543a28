import json

import pytest

from yolo.config import (
    TestConfig,
    TrainConfig,
    build_parser,
    config_from_dict,
    config_to_dict,
    parse_config,
    save_config_json,
)


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
        (["--model", "vgg16"], "choose one of"),
        (["--val-set", "2007"], "NAME:SPLIT"),
        (["--accum", "0"], "at least 1"),
        (["--model", "resnet18", "--darknet-weights", "x.weights"], "darknet model"),
    ],
)
def test_invalid_values_fail_with_the_flag_named(argv, message):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig(), argv)
    assert message in str(info.value)


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
