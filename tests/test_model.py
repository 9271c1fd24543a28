"""Model shapes, darknet's reorg and maxpool, init, and pretrained-weight handling."""

import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tests.test_darknet import darknet_maxpool_reference, reorg_c_loop
from utils.winit import init_darknet_conv, init_detection_head
from yolo.model import (
    DarknetMaxPool,
    YOLOv2Darknet19,
    YOLOv2ResNet,
    YOLOv2Tiny,
    build_model,
    darknet_reorg,
    upgrade_state_dict,
)

BACKBONES = ["tiny", "darknet19", "resnet18", "resnet50", "resnet101"]
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("size", [320, 416, 608])
def test_output_shape(backbone, size):
    # Shape propagation through the real forward on the meta device: no arithmetic.
    with torch.device("meta"):
        model = build_model(backbone)
        raw = model(torch.empty(2, 3, size, size))
    assert raw.shape == (2, 5 * 25, size // 32, size // 32)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_custom_classes_anchors_and_attributes(backbone):
    with torch.device("meta"):
        model = build_model(backbone, num_classes=3, num_anchors=4)
        raw = model(torch.empty(1, 3, 416, 352))
    assert raw.shape == (1, 4 * (5 + 3), 13, 11)
    assert (model.num_classes, model.num_anchors, model.backbone_name) == (3, 4, backbone)
    prediction = model.head.conv  # the linear prediction conv: bias, no BN, no activation
    assert isinstance(prediction, nn.Conv2d) and prediction.bias is not None
    assert prediction.out_channels == 4 * (5 + 3) and prediction.kernel_size == (1, 1)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_real_forward_is_finite(backbone):
    torch.manual_seed(0)
    model = build_model(backbone).eval()
    with torch.no_grad():
        raw = model(torch.rand(2, 3, 64, 96))
    assert raw.shape == (2, 125, 2, 3)
    assert torch.isfinite(raw).all()


@pytest.mark.parametrize("shape", [(1, 3, 416, 400), (1, 3, 100, 128), (1, 4, 64, 64), (3, 64, 64)])
def test_bad_input_shape_is_refused(shape):
    with torch.device("meta"):
        model = build_model("tiny")
        with pytest.raises(ValueError, match=r"model input must be|multiples of 32"):
            model(torch.empty(shape))


@pytest.mark.parametrize("shape", [(2, 8, 4, 6), (1, 64, 26, 26), (1, 4, 2, 2)])
def test_darknet_reorg_matches_c_loop(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = darknet_reorg(x)
    n, c, h, w = shape
    assert out.shape == (n, 4 * c, h // 2, w // 2)  # what darknet's layer reports
    assert torch.equal(out, reorg_c_loop(x, 2))


def test_darknet_reorg_is_not_pixel_unshuffle_up_to_channel_order():
    x = torch.arange(64 * 8 * 8, dtype=torch.float32).view(1, 64, 8, 8)
    ours, unshuffled = darknet_reorg(x), F.pixel_unshuffle(x, 2)
    assert ours.shape == unshuffled.shape
    # a channel permutation would keep the set of values at each position
    assert not torch.equal(ours[0, :, 0, 0].sort().values, unshuffled[0, :, 0, 0].sort().values)


def test_darknet_reorg_channels_last_and_gradient():
    x = torch.randn(2, 16, 6, 4, requires_grad=True)
    expected = reorg_c_loop(x.detach(), 2)
    assert torch.equal(darknet_reorg(x.to(memory_format=torch.channels_last)), expected)
    weights = torch.randn(expected.shape)
    (darknet_reorg(x) * weights).sum().backward()
    # a permutation: the gradient is the weights moved back to the inputs they came from
    assert torch.equal(x.grad.flatten().sort().values, weights.flatten().sort().values)


@pytest.mark.parametrize(("size", "stride"), [(2, 1), (2, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("hw", [(13, 13), (8, 6), (7, 10)])
def test_darknet_maxpool_matches_darknet(size, stride, hw):
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    assert torch.equal(DarknetMaxPool(size, stride)(x), darknet_maxpool_reference(x, size, stride))


def test_tiny_last_maxpool_keeps_size():
    pool = build_model("tiny").backbone[11]
    assert (pool.size, pool.stride) == (2, 1)
    assert pool(torch.randn(1, 2, 13, 13)).shape == (1, 2, 13, 13)


def test_detection_head_init():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3, num_anchors=2).train()
    bias = model.head.conv.bias.detach().view(2, 8)
    assert torch.allclose(bias[:, 4], torch.full((2,), math.log(0.01 / 0.99)))
    assert not bias[:, :4].any() and not bias[:, 5:].any()
    raw = model(torch.rand(2, 3, 96, 96)).detach().view(2, 2, 8, 3, 3)  # [N, A, 5+C, S, S]
    objectness = torch.sigmoid(raw[:, :, 4])
    assert 0.005 < objectness.mean() < 0.02
    assert raw[:, :, 2:4].abs().max() < 1.0  # boxes start close to the anchor shape


def test_detection_head_init_checks_channels():
    with pytest.raises(ValueError, match=r"expected num_anchors\*\(5\+num_classes\)"):
        init_detection_head(torch.nn.Conv2d(8, 124, 1), 5, 20)


def test_darknet_conv_init_is_darknets_uniform():
    conv = torch.nn.Conv2d(256, 512, 3, bias=False)
    init_darknet_conv(conv, generator=torch.Generator().manual_seed(0))
    scale = math.sqrt(2.0 / (3 * 3 * 256))
    assert conv.weight.abs().max() <= scale
    assert conv.weight.abs().max() > 0.99 * scale
    assert abs(conv.weight.std().item() - scale / math.sqrt(3)) < 0.01 * scale


def test_channels_last_and_autocast():
    torch.manual_seed(0)
    model = build_model("darknet19").eval()
    x = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x.to(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16 and low.shape == expected.shape
    assert torch.isfinite(low).all()


def test_unknown_name_and_darknet_pretrained_true():
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        build_model("vgg16")
    with pytest.raises(ValueError, match=r"darknet \.weights file .*no torchvision copy"):
        build_model("darknet19", pretrained=True)
    with pytest.raises(FileNotFoundError, match=r"missing\.weights"):
        build_model("tiny", pretrained="missing.weights")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache where every download fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert Path(torch.hub.get_dir()) == tmp_path / "hub"
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(3)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_resnet_pretrained_offline_error_names_the_file_and_flags(empty_hub):
    with pytest.raises(ConnectionError) as err:
        build_model("resnet18", pretrained=True)
    message = str(err.value)
    assert str(empty_hub / RESNET18_FILE) in message and "\n" not in message
    assert "--pretrained PATH" in message and "--no-pretrained" in message
    assert "pretrained=" not in message  # the CLI's words, not the Python API's
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback


def test_resnet_pretrained_reads_the_hub_cache(empty_hub, resnet18_state):
    empty_hub.mkdir(parents=True)
    torch.save(resnet18_state, empty_hub / RESNET18_FILE)
    model = build_model("resnet18", pretrained=True)
    assert torch.equal(model.stage16[0].weight, resnet18_state["conv1.weight"])
    assert torch.equal(model.stage32[1].bn2.running_var, resnet18_state["layer4.1.bn2.running_var"])


def test_resnet_pretrained_local_file(tmp_path, resnet18_state):
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    model = build_model("resnet18", pretrained=str(path))
    assert torch.equal(model.stage16[6][1].conv2.weight, resnet18_state["layer3.1.conv2.weight"])
    with pytest.raises(ValueError, match="not a torchvision resnet50 state dict"):
        build_model("resnet50", pretrained=path)
    torch.save({"model": resnet18_state, "epoch": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        build_model("resnet18", pretrained=tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="--no-pretrained"):
        build_model("resnet18", pretrained=tmp_path / "nope.pth")


def test_resnet_wiring_normalises_inside_and_routes_passthrough_first():
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    x = torch.rand(1, 3, 64, 96)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    head = model.head
    with torch.no_grad():
        fine = model.stage16((x - mean) / std)
        coarse = model.neck(model.stage32(fine))
        shortcut = F.pixel_unshuffle(head.passthrough(fine), 2)
        expected = head.conv(head.fuse(torch.cat([shortcut, coarse], dim=1)))
        assert torch.equal(model(x), expected)
    assert "mean" not in model.state_dict()  # a constant, not a weight


@pytest.mark.parametrize(
    ("name", "construct"),
    [
        ("darknet19", YOLOv2Darknet19),
        ("tiny", YOLOv2Tiny),
        ("resnet18", lambda: YOLOv2ResNet("resnet18")),
    ],
)
def test_constructor_initialises_as_build_model(name, construct):
    torch.manual_seed(5)
    built = build_model(name).state_dict()
    torch.manual_seed(5)
    constructed = construct().state_dict()
    assert list(constructed) == list(built)
    assert all(torch.equal(constructed[key], built[key]) for key in built)
    torch.manual_seed(6)
    other = construct().state_dict()
    assert not torch.equal(other["head.conv.weight"], built["head.conv.weight"])


def previous_layout_state_dict(model: nn.Module) -> dict:
    """The state dict the model had before YOLOv2Head: the same modules under the previous
    names (passthrough and fuse at the top, the prediction conv as ``head.conv``)."""
    previous = nn.Module()
    previous.stage16, previous.stage32, previous.neck = model.stage16, model.stage32, model.neck
    previous.passthrough, previous.fuse = model.head.passthrough, model.head.fuse
    previous.head = nn.Module()
    previous.head.conv = model.head.conv
    return previous.state_dict()


PREVIOUS_HEAD_KEYS = [  # the previous layout's keys outside the backbone and the neck
    *(f"{layer}.{key}" for layer in ("passthrough", "fuse") for key in (
        "conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked",
    )),
    "head.conv.weight", "head.conv.bias",
]  # fmt: skip


@pytest.mark.parametrize("name", ["darknet19", "resnet18"])
def test_previous_layout_loads_after_upgrade(name):
    torch.manual_seed(1)
    model = build_model(name).eval()
    with torch.no_grad():  # BN statistics that are not the defaults
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    previous = previous_layout_state_dict(model)
    assert [k for k in previous if not k.startswith(("stage", "neck"))] == PREVIOUS_HEAD_KEYS
    keys_before = list(previous)
    upgraded = upgrade_state_dict(previous)
    assert list(previous) == keys_before  # the argument is left as it was
    torch.manual_seed(2)
    fresh = build_model(name).eval()
    fresh.load_state_dict(upgraded)  # strict: every key found, none left over
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("name", ["darknet19", "tiny", "resnet18"])
def test_upgrade_leaves_the_current_layout_alone(name):
    with torch.device("meta"):
        state = build_model(name).state_dict()
    assert upgrade_state_dict(state) == state
