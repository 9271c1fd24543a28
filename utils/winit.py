"""Weight initialisation for the detector's convolutions.

Three schemes, each a pure in-place function of one layer:

- ``init_darknet_conv``: what darknet's ``make_convolutional_layer`` does (the YOLOv2-era
  source): weights ``uniform(-1, 1) * sqrt(2 / (k*k*c_in))``, biases 0. Used for every conv of
  a Darknet model trained from scratch, so that such a run starts where darknet's would.
- ``init_kaiming_conv``: He-normal for convolutions followed by BN and leaky ReLU (the new
  layers on top of a pretrained ResNet).
- ``init_detection_head``: the linear prediction conv. Small weights so that the first outputs
  are close to the biases, and biases that make the first predictions sensible: box offsets
  and sizes 0 (boxes start centred in their cell at exactly the anchor shape), class logits 0
  (uniform softmax), objectness ``logit(objectness_prior)``.

Why a small objectness prior (default 0.01, bias ``log(0.01/0.99) = -4.595``): at 416 the head
makes 13*13*5 = 845 predictions per image against a handful of objects. Starting at
sigmoid(0) = 0.5, the no-object term of ~840 predictions would dominate the first updates and
spend them on pushing every objectness down; starting near the true base rate of objects
(a few in 845, so ~0.01) removes that transient, as the focal-loss paper's prior does.
"""

import math

import torch
from torch import nn

__all__ = [
    "DEFAULT_OBJECTNESS_PRIOR",
    "HEAD_WEIGHT_STD",
    "init_darknet_conv",
    "init_detection_head",
    "init_kaiming_conv",
]

DEFAULT_OBJECTNESS_PRIOR = 0.01
HEAD_WEIGHT_STD = 0.01
OBJECTNESS_INDEX = 4  # channel k within an anchor's group: tx, ty, tw, th, to, classes


@torch.no_grad()
def init_darknet_conv(conv: nn.Conv2d, generator: torch.Generator | None = None) -> None:
    """Darknet's conv init: ``w ~ uniform(-1, 1) * sqrt(2 / (k_h*k_w*c_in/groups))``, bias 0."""
    fan_in = conv.weight[0].numel()  # c_in/groups * k_h * k_w
    scale = math.sqrt(2.0 / fan_in)
    conv.weight.uniform_(-scale, scale, generator=generator)
    if conv.bias is not None:
        conv.bias.zero_()


@torch.no_grad()
def init_kaiming_conv(conv: nn.Conv2d, negative_slope: float = 0.1) -> None:
    """He-normal (fan-in) init for a conv followed by leaky ReLU of ``negative_slope``; bias 0."""
    nn.init.kaiming_normal_(conv.weight, a=negative_slope, mode="fan_in", nonlinearity="leaky_relu")
    if conv.bias is not None:
        conv.bias.zero_()


@torch.no_grad()
def init_detection_head(
    conv: nn.Conv2d,
    num_anchors: int,
    num_classes: int,
    objectness_prior: float = DEFAULT_OBJECTNESS_PRIOR,
    weight_std: float = HEAD_WEIGHT_STD,
) -> None:
    """Initialise the linear prediction conv of a YOLOv2 head in place.

    The conv has ``num_anchors * (5 + num_classes)`` output channels laid out as channel
    ``a*(5+C) + k`` with k = tx, ty, tw, th, to, then C class logits. Weights get
    ``normal(0, weight_std)``; biases are 0 except the objectness bias of every anchor, which is
    ``logit(objectness_prior)`` so that ``sigmoid(to)`` starts at about the prior.
    """
    expected = num_anchors * (5 + num_classes)
    if conv.out_channels != expected:
        raise ValueError(
            f"prediction conv has {conv.out_channels} output channels, expected "
            f"num_anchors*(5+num_classes) = {num_anchors}*(5+{num_classes}) = {expected}"
        )
    if conv.bias is None:
        raise ValueError("the prediction conv needs a bias (build it with bias=True)")
    if not 0.0 < objectness_prior < 1.0:
        raise ValueError(f"objectness_prior must be in (0, 1), got {objectness_prior}")
    nn.init.normal_(conv.weight, mean=0.0, std=weight_std)
    conv.bias.zero_()
    bias = conv.bias.view(num_anchors, 5 + num_classes)  # [A*(5+C)] -> [A, 5+C]
    bias[:, OBJECTNESS_INDEX] = math.log(objectness_prior / (1.0 - objectness_prior))
