import pytest
import torch
from torch import nn

from yolo.build import build_optimizer, initial_weights
from yolo.checkpoint import FORMAT, save_checkpoint
from yolo.darknet import save_darknet_weights
from yolo.model import build_model


def test_weight_decay_only_on_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {4}
    assert {p.ndim for p in plain["params"]} == {1}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    no_decay = {model[1].weight, model[1].bias, model[2].bias}  # BN scale and shift, a bias
    assert {id(p) for p in plain["params"]} == {id(p) for p in no_decay}


def test_adamw_keeps_the_decay_groups_and_unknown_names_fail():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, lr=0.01, momentum=0.8, weight_decay=5e-4, name="adamw")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    assert optimizer.defaults["betas"][0] == 0.8
    with pytest.raises(ValueError, match="sgd or adamw"):
        build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0.0, name="lamb")


def test_weights_for_another_class_count_fill_all_but_the_prediction_conv(tmp_path, caplog):
    torch.manual_seed(0)
    voc = build_model("tiny", num_classes=20)  # stands in for darknet's yolov2-tiny-voc
    save_darknet_weights(voc, tmp_path / "voc.weights")
    save_checkpoint(
        {"model": voc.state_dict(), "config": {}, "format": FORMAT}, tmp_path / "voc.pt"
    )
    for source in ("voc.weights", "voc.pt"):
        torch.manual_seed(1)
        mine = build_model("tiny", num_classes=1)  # a one-class dataset
        head = mine.head.conv.weight.clone()
        initial_weights(mine, str(tmp_path / source))
        assert torch.equal(mine.head.conv.weight, head)  # its own, sized for one class
        assert torch.equal(mine.neck.conv.weight, voc.neck.conv.weight)
        assert torch.equal(mine.backbone[0].bn.running_var, voc.backbone[0].bn.running_var)
        assert "the prediction conv starts from scratch" in caplog.text
        caplog.clear()
        same = build_model("tiny", num_classes=20)
        initial_weights(same, str(tmp_path / source))
        assert torch.equal(same.head.conv.weight, voc.head.conv.weight) and not caplog.text
    with pytest.raises(ValueError, match="darknet19 and tiny models only"):
        initial_weights(build_model("resnet18"), str(tmp_path / "voc.weights"))


def test_weights_of_another_layout_are_refused(tmp_path):
    torch.manual_seed(0)
    backbone = tmp_path / "backbone.weights"  # what darknet19_448.conv.23 is to darknet19
    save_darknet_weights(build_model("tiny"), backbone)
    data = backbone.read_bytes()
    backbone.write_bytes(data[: len(data) - 4 * 1000])  # not whole layers of this model
    with pytest.raises(ValueError, match="neither this tiny model nor one of another class"):
        initial_weights(build_model("tiny", num_classes=1), str(backbone))
