"""torchvision's ResNets as YOLOv2 backbones, with their ImageNet weights from torchvision's
hub cache (downloaded once) or a local file, and never silently random when weights were asked
for."""

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

__all__ = ["RESNETS", "build_resnet"]

logger = logging.getLogger(__name__)

RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
}


def download_resnet_state(weights: torchvision.models.WeightsEnum) -> dict:
    """torchvision's pretrained state dict (downloaded once, then read from the hub cache)."""
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as err:  # URLError, DNS failure, timeout: no internet and nothing cached
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        raise ConnectionError(
            f"could not download the ImageNet weights {weights} from {weights.url} ({err}): "
            f"offline, put that file at {cached}, or pass a copy with --pretrained PATH, or "
            "train the backbone from scratch with --no-pretrained"
        ) from None


def read_resnet_state(path: str | os.PathLike, name: str) -> dict:
    """A local state dict of torchvision's ``name``, read with ``weights_only=True``."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"pretrained weights file {os.fspath(path)!r} not found: pass the path of a "
            f"torchvision {name} state dict (.pth), or use --no-pretrained"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            f"{os.fspath(path)!r} is not a state dict of tensors (a training checkpoint?): "
            f"pass a torchvision {name} state dict, e.g. torch.save(resnet.state_dict(), path)"
        )
    return state


def build_resnet(name: str, pretrained: bool | str | os.PathLike) -> torchvision.models.ResNet:
    """torchvision's ResNet ``name``, with pretrained weights when asked (never silently not)."""
    builder, weights_enum = RESNETS[name]
    resnet = builder(weights=None)
    if pretrained is False or pretrained is None:
        return resnet
    if pretrained is True:
        state, source = download_resnet_state(weights_enum.DEFAULT), str(weights_enum.DEFAULT)
    else:
        state, source = read_resnet_state(pretrained, name), os.fspath(pretrained)
    # The ImageNet classifier is dropped, so its shape (class count) does not matter.
    expected = {k: v.shape for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    found = {k: v.shape for k, v in state.items() if not k.startswith("fc.")}
    if found != expected:
        wrong = [k for k in expected if found.get(k) != expected[k]] + sorted(
            found - expected.keys()
        )
        raise ValueError(
            f"{source} is not a torchvision {name} state dict: {len(wrong)} keys missing, "
            f"unexpected or of another shape (first: {', '.join(wrong[:3])})"
        )
    resnet.load_state_dict(state, strict=False)
    logger.info("loaded %s backbone weights from %s", name, source)
    return resnet
