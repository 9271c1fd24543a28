import pytest
import torch
from torch import nn

from yolo.build import build_optimizer


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
