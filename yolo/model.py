"""YOLOv2 detectors: Darknet-19 and tiny (darknet's cfgs layer for layer) and ResNet backbones.

Every model maps images ``[N, 3, H, W]`` (RGB in [0, 1], H and W multiples of 32) to the raw
head output ``[N, A*(5+C), H/32, W/32]``, channel ``a*(5+C) + k`` with k = tx, ty, tw, th, to,
then C class logits (darknet's region-layer order). The prediction conv is linear.

- ``darknet19``: ``cfg/yolov2-voc.cfg``: 23 convs, 5 maxpools; its last layers are the
  :class:`YOLOv2Head` (the 1x1 64-filter conv on the stride-16 feature, darknet's ``[reorg]``,
  the route ``[passthrough, conv 20]`` of 1280 channels, a 3x3 conv and the prediction conv).
- ``tiny``: ``cfg/yolov2-tiny-voc.cfg``: 9 convs, 6 maxpools (the last one 2x2 stride 1).
- ``resnet18/50/101``: torchvision's ResNet with ImageNet normalisation inside and the same
  :class:`YOLOv2Head` on its stride-16 and stride-32 stages.

Weights are initialised in the constructors. Darknet models list their convs in cfg order
(``darknet_layers()``), the order of darknet's ``.weights`` files (see ``yolo.darknet``).
"""

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from utils.winit import init_darknet_conv, init_detection_head, init_kaiming_conv
from yolo.darknet import load_darknet_weights
from yolo.names import MODEL_NAMES
from yolo.resnet import RESNETS, build_resnet

__all__ = [
    "MODEL_NAMES",
    "ConvBlock",
    "DarknetMaxPool",
    "DarknetReorg",
    "YOLOv2Darknet19",
    "YOLOv2Head",
    "YOLOv2ResNet",
    "YOLOv2Tiny",
    "build_model",
    "darknet_reorg",
    "upgrade_state_dict",
]

logger = logging.getLogger(__name__)

LEAKY_SLOPE = 0.1
BN_EPS = 1e-5  # darknet's GPU path and its weight folding: (x - mean) / sqrt(var + 1e-5)
OUTPUT_STRIDE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Layer specs in cfg order: ("conv", filters, size) with pad = size // 2, BN and leaky;
# ("max", size, stride) for darknet's maxpool.
DARKNET19_TO_STRIDE16 = (  # yolov2-voc.cfg layers 0-16: conv 1-13
    ("conv", 32, 3), ("max", 2, 2), ("conv", 64, 3), ("max", 2, 2),
    ("conv", 128, 3), ("conv", 64, 1), ("conv", 128, 3), ("max", 2, 2),
    ("conv", 256, 3), ("conv", 128, 1), ("conv", 256, 3), ("max", 2, 2),
    ("conv", 512, 3), ("conv", 256, 1), ("conv", 512, 3), ("conv", 256, 1), ("conv", 512, 3),
)  # fmt: skip
DARKNET19_TO_STRIDE32 = (  # layers 17-22: conv 14-18, the end of darknet19_448.conv.23
    ("max", 2, 2),
    ("conv", 1024, 3), ("conv", 512, 1), ("conv", 1024, 3), ("conv", 512, 1), ("conv", 1024, 3),
)  # fmt: skip
TINY_BACKBONE = (  # yolov2-tiny-voc.cfg layers 0-12: conv 1-7
    ("conv", 16, 3), ("max", 2, 2), ("conv", 32, 3), ("max", 2, 2), ("conv", 64, 3), ("max", 2, 2),
    ("conv", 128, 3), ("max", 2, 2), ("conv", 256, 3), ("max", 2, 2), ("conv", 512, 3),
    ("max", 2, 1), ("conv", 1024, 3),
)  # fmt: skip


def darknet_reorg(x: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Darknet's ``[reorg]`` layer (``reorg_cpu(x, w, h, c, batch, stride, forward=0)``).

    Args:
        x: ``[N, C, H, W]``, C divisible by ``stride**2``, H and W divisible by ``stride``.
    Returns:
        ``[N, C*stride**2, H/stride, W/stride]`` in darknet's memory order: the input buffer
        is read as ``[N, C/s^2, H*s, W*s]`` and output element ``(k, j, i)`` of an
        ``[N, C, H, W]`` buffer is input ``(k % (C/s^2), j*s + (k // (C/s^2)) // s,
        i*s + (k // (C/s^2)) % s)``; that buffer is then read as the layer's reported shape.
        This is neither ``pixel_unshuffle`` nor a channel permutation of it: because darknet
        indexes the ``[C, H, W]`` input as ``[C/s^2, sH, sW]``, one output position gathers
        values from unrelated places of the input. Reshape/permute only (exports to ONNX).
    """
    n, c, h, w = x.shape
    s = stride
    if c % (s * s) or h % s or w % s:
        raise ValueError(
            f"darknet_reorg needs C divisible by {s * s} and H, W divisible by {s}; "
            f"got shape {tuple(x.shape)}"
        )
    x = x.reshape(n, c // (s * s), h, s, w, s)  # [N, C/s², H, dy, W, dx]: buffer as [C/s², sH, sW]
    x = x.permute(0, 3, 5, 1, 2, 4)  # [N, dy, dx, C/s², H, W]: k = (dy*s + dx)*C/s² + c2
    return x.reshape(n, c * s * s, h // s, w // s)  # buffer [N, C, H, W] read as reported shape


class DarknetReorg(nn.Module):
    """:func:`darknet_reorg` as a layer (no weights), so that it shows in the model's repr."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return darknet_reorg(x)


class DarknetMaxPool(nn.Module):
    """Darknet's ``[maxpool]``: padding ``size-1`` (-inf), window ``i`` starting at input
    ``i*stride - pad/2`` (C division, so 0 for size 2: the padding is all right/bottom), and
    ``out = (in + size - 1 - size) // stride + 1``; size 2 stride 1 keeps the spatial size."""

    def __init__(self, size: int, stride: int) -> None:
        super().__init__()
        self.size = size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.size - 1
        before, after = pad // 2, pad - pad // 2
        h, w = x.shape[-2:]
        darknet_out = ((h + pad - self.size) // self.stride, (w + pad - self.size) // self.stride)
        plain_out = ((h - self.size) // self.stride, (w - self.size) // self.stride)
        if before or darknet_out != plain_out:  # else the padding never reaches a window
            x = F.pad(x, (before, after, before, after), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}"


class ConvBlock(nn.Module):
    """Darknet's ``[convolutional]``: conv (no bias when BN follows), BN, leaky 0.1; or, with
    ``batch_norm=False, leaky=False``, a linear conv with bias (tiny's prediction layer)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: int,
        *,
        batch_norm: bool = True,
        leaky: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, size, padding=size // 2, bias=not batch_norm
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS) if batch_norm else None
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if leaky else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


def make_darknet_stage(in_channels: int, spec: Sequence[tuple[str, int, int]]) -> nn.Sequential:
    """An ``nn.Sequential`` of ``ConvBlock``/``DarknetMaxPool`` from a cfg-order layer spec."""
    layers: list[nn.Module] = []
    for kind, a, b in spec:
        if kind == "conv":
            layers.append(ConvBlock(in_channels, a, b))
            in_channels = a
        else:
            layers.append(DarknetMaxPool(a, b))
    return nn.Sequential(*layers)


def check_images(images: torch.Tensor) -> None:
    """Raise a clear error unless ``images`` is ``[N, 3, H, W]`` with H, W multiples of 32."""
    shape = tuple(images.shape)
    if images.dim() != 4 or shape[1] != 3:
        raise ValueError(f"model input must be [N, 3, H, W] RGB images; got shape {shape}")
    if shape[2] % OUTPUT_STRIDE or shape[3] % OUTPUT_STRIDE or shape[2] == 0 or shape[3] == 0:
        raise ValueError(
            f"image height and width must be positive multiples of {OUTPUT_STRIDE}; got "
            f"{shape[2]}x{shape[3]}: resize or pad the batch (e.g. to 416x416)"
        )


class YOLOv2Head(nn.Module):
    """YOLOv2's head on a stride-16 and a stride-32 feature (``yolov2-voc.cfg`` layers 25-30).

    The passthrough (a 1x1 conv of the stride-16 feature to 64 channels, then the space-to-depth
    ``reorg`` to 256 channels at stride 32), the route ``[passthrough, coarse]``, a 3x3 conv to
    1024 channels (``fuse``) and the linear 1x1 prediction conv ``conv`` (with bias, no BN).
    ``forward(fine [N, C16, H/16, W/16], coarse [N, C32, H/32, W/32])`` -> the raw head
    ``[N, A*(5+C), H/32, W/32]``. Weights are the modules' defaults; the models initialise them.
    """

    def __init__(self, fine_channels: int, coarse_channels: int, outputs: int, reorg: nn.Module):
        super().__init__()
        self.passthrough = ConvBlock(fine_channels, 64, 1)
        self.reorg = reorg
        self.fuse = ConvBlock(4 * 64 + coarse_channels, 1024, 3)
        self.conv = nn.Conv2d(1024, outputs, 1)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        shortcut = self.reorg(self.passthrough(fine))  # [N, 64, H/16, W/16] -> [N, 256, H/32, ...]
        routed = torch.cat([shortcut, coarse], dim=1)  # [N, 256 + C32, H/32, W/32], reorg first
        return self.conv(self.fuse(routed))  # [N, A*(5+C), H/32, W/32]

    def conv_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """``(conv, bn or None)`` of its three convs in cfg order."""
        return [(b.conv, b.bn) for b in (self.passthrough, self.fuse)] + [(self.conv, None)]


class YOLOv2Darknet19(nn.Module):
    """YOLOv2 on Darknet-19, layer for layer ``cfg/yolov2-voc.cfg``; input RGB in [0, 1].

    Initialised as darknet trains from scratch (``init_darknet_conv``), the prediction conv
    with ``init_detection_head``."""

    def __init__(self, num_classes: int = 20, num_anchors: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.backbone_name = "darknet19"
        self.stage16 = make_darknet_stage(3, DARKNET19_TO_STRIDE16)
        self.stage32 = make_darknet_stage(512, DARKNET19_TO_STRIDE32)
        self.neck = nn.Sequential(ConvBlock(1024, 1024, 3), ConvBlock(1024, 1024, 3))  # 19, 20
        outputs = num_anchors * (5 + num_classes)
        self.head = YOLOv2Head(512, 1024, outputs, DarknetReorg())  # conv 21-23
        init_darknet_model(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        fine = self.stage16(images)  # [N, 512, H/16, W/16]
        coarse = self.neck(self.stage32(fine))  # [N, 1024, H/32, W/32]
        return self.head(fine, coarse)  # [N, A*(5+C), H/32, W/32]

    def darknet_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """``(conv, bn or None)`` of the 23 conv layers in cfg (and ``.weights`` file) order."""
        blocks = [m for m in (*self.stage16, *self.stage32, *self.neck) if isinstance(m, ConvBlock)]
        return [(block.conv, block.bn) for block in blocks] + self.head.conv_layers()


class YOLOv2Tiny(nn.Module):
    """Tiny YOLOv2, layer for layer ``cfg/yolov2-tiny-voc.cfg``; input RGB in [0, 1].

    Its own two-conv head (no passthrough); initialised as :class:`YOLOv2Darknet19`."""

    def __init__(self, num_classes: int = 20, num_anchors: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.backbone_name = "tiny"
        self.backbone = make_darknet_stage(3, TINY_BACKBONE)  # conv 1-7
        self.neck = ConvBlock(1024, 1024, 3)  # conv 8
        outputs = num_anchors * (5 + num_classes)
        self.head = ConvBlock(1024, outputs, 1, batch_norm=False, leaky=False)  # conv 9
        init_darknet_model(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.head(self.neck(self.backbone(images)))  # [N, A*(5+C), H/32, W/32]

    def darknet_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """``(conv, bn or None)`` of the 9 conv layers in cfg (and ``.weights`` file) order."""
        blocks = [m for m in self.backbone if isinstance(m, ConvBlock)]
        return [(block.conv, block.bn) for block in (*blocks, self.neck, self.head)]


def init_darknet_model(model: YOLOv2Darknet19 | YOLOv2Tiny) -> None:
    """Darknet's from-scratch init for every conv; the prediction conv gets the head init."""
    for conv, _ in model.darknet_layers():
        init_darknet_conv(conv)
    init_detection_head(model.head.conv, model.num_anchors, model.num_classes)


class YOLOv2ResNet(nn.Module):
    """The :class:`YOLOv2Head` on a torchvision ResNet ``name``; input RGB in [0, 1].

    ``layer3`` (stride 16) feeds the passthrough; ``layer4`` (stride 32) and two 3x3 1024 convs
    (``neck``) the coarse path. The space-to-depth is ``pixel_unshuffle``, not darknet's reorg:
    no darknet weights need its memory order here, and each output channel stays a true 2x2
    sub-grid of one input channel. ``resnet``: the backbone (default: torchvision's, random);
    the layers on top of it get He init, the prediction conv ``init_detection_head``.
    """

    def __init__(
        self,
        name: str = "resnet18",
        num_classes: int = 20,
        num_anchors: int = 5,
        *,
        resnet: torchvision.models.ResNet | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.backbone_name = name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        r = build_resnet(name, pretrained=False) if resnet is None else resnet
        self.stage16 = nn.Sequential(
            r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3
        )
        self.stage32 = r.layer4
        channels32 = r.fc.in_features  # 512 (resnet18) or 2048 (resnet50/101)
        self.neck = nn.Sequential(ConvBlock(channels32, 1024, 3), ConvBlock(1024, 1024, 3))
        outputs = num_anchors * (5 + num_classes)
        self.head = YOLOv2Head(channels32 // 2, 1024, outputs, nn.PixelUnshuffle(2))
        new_layers = [(block.conv, block.bn) for block in self.neck] + self.head.conv_layers()
        for conv, _ in new_layers:  # then the prediction conv gets its own init
            init_kaiming_conv(conv, LEAKY_SLOPE)
        init_detection_head(self.head.conv, num_anchors, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        fine = self.stage16((images - self.mean) / self.std)  # [N, C16, H/16, W/16]
        coarse = self.neck(self.stage32(fine))  # [N, 1024, H/32, W/32]
        return self.head(fine, coarse)  # [N, A*(5+C), H/32, W/32]


def upgrade_state_dict(state_dict: dict) -> dict:
    """A model state dict of the layout before :class:`YOLOv2Head` -> the current keys (pure).

    darknet19 and the ResNets kept ``passthrough.*`` and ``fuse.*`` at the top; they now sit
    in ``head.`` (whose prediction conv keeps its keys ``head.conv.*``). Other keys, and state
    dicts of the current layout or of the tiny model, come back unchanged.
    """
    moved = ("passthrough.", "fuse.")
    return {
        f"head.{key}" if key.startswith(moved) else key: value for key, value in state_dict.items()
    }


def build_model(
    name: str,
    num_classes: int = 20,
    num_anchors: int = 5,
    pretrained: bool | str | os.PathLike = False,
) -> nn.Module:
    """Build a YOLOv2 detector.

    Args:
        name: "darknet19", "tiny", "resnet18", "resnet50" or "resnet101".
        pretrained: False: random init. Darknet models: a path to a darknet ``.weights`` file
            (the full model or a prefix such as ``darknet19_448.conv.23``). ResNets: True for
            torchvision's DEFAULT ImageNet weights, or a path to a local state dict.
    Returns:
        A module mapping ``[N, 3, H, W]`` RGB in [0, 1] to ``[N, A*(5+C), H/32, W/32]``, with
        attributes ``num_classes``, ``num_anchors`` and ``backbone_name``.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if num_classes < 1 or num_anchors < 1:
        raise ValueError(
            f"need num_classes >= 1 and num_anchors >= 1, got {num_classes}, {num_anchors}"
        )
    if name in RESNETS:
        resnet = build_resnet(name, pretrained)
        return YOLOv2ResNet(name, num_classes, num_anchors, resnet=resnet)
    if pretrained is True:
        raise ValueError(
            f"{name} takes a darknet .weights file as pretrained (a path, e.g. "
            "darknet19_448.conv.23 or yolov2-voc.weights); there is no torchvision copy"
        )
    model_class = YOLOv2Darknet19 if name == "darknet19" else YOLOv2Tiny
    model = model_class(num_classes, num_anchors)
    if pretrained not in (False, None):
        load_darknet_weights(model, pretrained)
    return model
