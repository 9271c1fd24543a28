"""Darknet ``.weights`` files: read and write the conv layers of the darknet models.

Layout (little-endian): a header of int32 ``major, minor, revision``, then ``seen`` (images
seen in training): int32 when ``major*10 + minor < 2``, else uint64 (darknet's size_t); so the
header is 16 or 20 bytes. Then float32 per conv layer in cfg order: biases, then (when the
layer has BN) scales, rolling mean, rolling variance, then the weights (OIHW). For a BN layer
"biases" are BN's shift (the conv itself has none).

``yolov2-voc.weights`` is a 16-byte header (version 0.1) and 50,676,061 floats:
202,704,260 bytes; ``darknet19_448.conv.23`` (the first 23 layers of darknet19_448.cfg, i.e.
its first 18 convs) is a 16-byte header and 19,831,776 floats: 79,327,120 bytes. A file may
hold any whole number of leading conv layers (darknet reads until the file ends); anything
else is refused with what was expected and what was found.
"""

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.fileio import atomic_open

__all__ = [
    "darknet_conv_layers",
    "darknet_weights_nbytes",
    "load_darknet_weights",
    "save_darknet_weights",
]

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4
YOLO_VOC_2_0_BYTES = 268_632_452  # yolo-voc.weights for cfg/yolo-voc.2.0.cfg
KNOWN_PREFIXES = {"darknet19": (18, "darknet19_448.conv.23")}

ConvLayer = tuple[nn.Conv2d, nn.BatchNorm2d | None]


def darknet_conv_layers(model: nn.Module) -> list[ConvLayer]:
    """``(conv, bn or None)`` for every conv layer of a darknet model, in cfg order."""
    layers = getattr(model, "darknet_layers", None)
    if layers is None:
        name = getattr(model, "backbone_name", type(model).__name__)
        raise ValueError(
            f"darknet .weights files fit the darknet19 and tiny models only, not {name!r}"
        )
    return layers()


def layer_tensors(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> list[torch.Tensor]:
    """One layer's tensors in file order: biases, [scales, mean, variance], weights."""
    if bn is None:
        return [conv.bias, conv.weight]
    return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]


def layer_float_counts(layers: list[ConvLayer]) -> list[int]:
    """Floats each conv layer takes in a ``.weights`` file."""
    return [sum(t.numel() for t in layer_tensors(conv, bn)) for conv, bn in layers]


def header_bytes_for(major: int, minor: int) -> int:
    """16 (int32 seen) or 20 (uint64 seen), as darknet's ``load_weights`` decides."""
    return 20 if major * 10 + minor >= 2 else 16


def darknet_weights_nbytes(
    model: nn.Module, num_layers: int | None = None, *, header_bytes: int = 16
) -> int:
    """Size in bytes of a ``.weights`` file holding the first ``num_layers`` conv layers."""
    counts = layer_float_counts(darknet_conv_layers(model))
    return header_bytes + FLOAT_BYTES * sum(counts[:num_layers])


def read_header(path: Path) -> tuple[int, int, int, int, int]:
    """``(major, minor, revision, seen, header_bytes)`` of a ``.weights`` file."""
    with path.open("rb") as f:
        head = f.read(20)
    version = np.frombuffer(head[:12], dtype="<i4").tolist() if len(head) >= 12 else None
    if version is None or not all(0 <= v < 1000 for v in version):
        raise ValueError(
            f"{path}: not a darknet .weights file (header {version}, {len(head)}+ bytes): "
            "expected int32 major, minor, revision in [0, 1000), then seen"
        )
    major, minor, revision = version
    header = header_bytes_for(major, minor)
    if len(head) < header:
        raise ValueError(
            f"{path}: shorter than the {header}-byte header of version {major}.{minor}"
        )
    seen = int(np.frombuffer(head[12:header], dtype="<i4" if header == 16 else "<u8")[0])
    return major, minor, revision, seen, header


def size_hints(found: int, header: int, counts: list[int], head_in: int) -> list[str]:
    """Likely reasons why a file of ``found`` bytes does not fit the model."""
    hints = []
    if found == YOLO_VOC_2_0_BYTES:
        hints.append(
            "this is the size of yolo-voc.weights for the older yolo-voc.2.0.cfg (reorg of the "
            "512-channel feature, a 3072-channel route), which does not fit yolov2-voc.cfg"
        )
    other = 36 - header  # the other header size, 20 <-> 16
    if found - other == FLOAT_BYTES * sum(counts):
        hints.append(
            f"with a {other}-byte header the file would fit: its version fields do not match "
            f"its layout (darknet reads a {header}-byte header for this version)"
        )
    head_floats = (found - header) // FLOAT_BYTES - sum(counts[:-1])
    if head_floats > 0 and head_floats % (head_in + 1) == 0 and (found - header) % FLOAT_BYTES == 0:
        hints.append(
            f"the file's prediction layer has {head_floats // (head_in + 1)} filters; this model's "
            f"has {counts[-1] // (head_in + 1)} = num_anchors*(5+num_classes): build the model "
            "with the num_classes and num_anchors the file was trained with"
        )
    return hints


def count_layers_in_file(path: Path, model: nn.Module, found: int, header: int) -> int:
    """How many whole conv layers a file of ``found`` bytes holds; a clear error if none fit."""
    layers = darknet_conv_layers(model)
    counts = layer_float_counts(layers)
    payload = found - header
    total = 0
    for k, count in enumerate(counts, start=1):
        total += count
        if payload == FLOAT_BYTES * total:
            return k
    name = getattr(model, "backbone_name", type(model).__name__)
    full = header + FLOAT_BYTES * sum(counts)
    lines = [
        f"{path}: {found:,} bytes do not fit the {name} model. Expected {full:,} bytes for the "
        f"full model ({sum(counts):,} floats after a {header}-byte header) or a whole number "
        "of leading conv layers"
    ]
    if name in KNOWN_PREFIXES:
        k, file_name = KNOWN_PREFIXES[name]
        lines.append(f"(e.g. {file_name}: {k} layers, {header + 4 * sum(counts[:k]):,} bytes)")
    lines.append(f"; found {found:,} bytes = {header}-byte header + {payload:,} bytes.")
    lines += size_hints(found, header, counts, layers[-1][0].in_channels)
    raise ValueError(" ".join(lines))


def prediction_filters_in_file(model: nn.Module, path: Path) -> int | None:
    """The filter count of a ``.weights`` file's prediction conv when the file holds every
    layer of ``model`` but with another prediction conv (another class or anchor count, as
    ``yolov2-voc.weights`` for a one-class dataset), else None."""
    layers = darknet_conv_layers(model)
    counts = layer_float_counts(layers)
    header = read_header(path)[4]
    rest = path.stat().st_size - header - FLOAT_BYTES * sum(counts[:-1])
    conv = layers[-1][0]
    per_filter = FLOAT_BYTES * (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1)
    return rest // per_filter if rest > 0 and rest % per_filter == 0 else None


@torch.no_grad()
def load_darknet_weights(
    model: nn.Module, path: str | os.PathLike, *, max_layers: int | None = None
) -> dict:
    """Load a darknet ``.weights`` file (the full model or leading conv layers) in place.

    ``max_layers``: load only the first layers, from a file whose later layers may differ (a
    model for another class count: its prediction layer is left as it is).

    Returns:
        ``{"major", "minor", "revision", "seen", "header_bytes", "layers_loaded",
        "layers_total"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"darknet weights file {os.fspath(path)!r} not found")
    layers = darknet_conv_layers(model)
    major, minor, revision, seen, header = read_header(path)
    found = path.stat().st_size
    if max_layers is None:
        num_layers = count_layers_in_file(path, model, found, header)
    else:
        num_layers = max_layers
        needed = header + FLOAT_BYTES * sum(layer_float_counts(layers)[:max_layers])
        if found < needed:
            raise ValueError(
                f"{path}: {found:,} bytes hold fewer than the first {max_layers} conv layers of "
                f"the {getattr(model, 'backbone_name', 'darknet')} model ({needed:,} bytes)"
            )
    floats = np.fromfile(path, dtype="<f4", offset=header)
    values = torch.from_numpy(floats)
    pos = 0
    for conv, bn in layers[:num_layers]:
        for tensor in layer_tensors(conv, bn):
            tensor.copy_(values[pos : pos + tensor.numel()].view(tensor.shape))
            pos += tensor.numel()
    logger.info(
        "loaded %d of %d conv layers from %s (version %d.%d.%d, seen %d)",
        num_layers,
        len(layers),
        path,
        major,
        minor,
        revision,
        seen,
    )
    return {
        "major": major,
        "minor": minor,
        "revision": revision,
        "seen": seen,
        "header_bytes": header,
        "layers_loaded": num_layers,
        "layers_total": len(layers),
    }


def save_darknet_weights(model: nn.Module, path: str | os.PathLike, *, seen: int = 0) -> None:
    """Write the model's conv layers as a darknet ``.weights`` file (atomically).

    The header is version 0.1.0 with an int32 ``seen`` (16 bytes, as ``yolov2-voc.weights``),
    or version 0.2.0 with a uint64 ``seen`` (20 bytes) when ``seen`` needs more than 31 bits.
    """
    if not 0 <= seen < 2**64:
        raise ValueError(f"seen must be in [0, 2**64), got {seen}")
    layers = darknet_conv_layers(model)
    path = Path(path)
    wide = seen >= 2**31
    header = np.array([0, 2 if wide else 1, 0], dtype="<i4").tobytes()
    header += np.array([seen], dtype="<u8" if wide else "<i4").tobytes()
    with atomic_open(path, "wb") as f:
        f.write(header)
        for conv, bn in layers:
            for tensor in layer_tensors(conv, bn):
                data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                f.write(data.astype("<f4", copy=False).tobytes())
