"""ONNX export of a trained detector: the engine of ``export.py``.

The exported graph takes ``images`` ``[N, 3, H, W]`` float32 RGB in [0, 1], H and W multiples
of 32 (the graph does not check this), and outputs either

- with ``decode``: ``boxes`` ``[N, P, 4]`` normalised xyxy (not clipped) and ``scores``
  ``[N, P, C]`` = objectness * class probability, the per-class scores :func:`yolo.nms.
  postprocess` thresholds; P = (H/32)*(W/32)*A, prediction ``(row*W/32 + col)*A + a``. A
  consumer only has to threshold, run NMS per class, then clip (darknet's order);
- without: ``raw`` ``[N, A*(5+C), H/32, W/32]``, the head before any activation (see
  :mod:`yolo.converter` for its layout), to decode with the anchors in the metadata.

The model's metadata_props hold ``classes`` and ``anchors`` (JSON; anchors ``[A, 2]`` (w, h)
in cells of the output grid, stride 32, darknet's ``anchors=`` numbers) and a description of
the outputs; the decoded graph reads the grid from the input's size, so its boxes are right
at every size. Darknet's reorg exports as plain Reshape/Transpose. The file is written
atomically and, with ``check``, only after onnxruntime has reproduced PyTorch's outputs on
random images (at a second batch size and image size where those axes are dynamic).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.fileio import atomic_path
from yolo.checkpoint import load_checkpoint, save_checkpoint
from yolo.config import ExportConfig
from yolo.converter import decode
from yolo.load import find_weights, load_trained_model, require_weights
from yolo.release import release_checkpoint, save_safetensors

__all__ = ["DecodedYOLO", "ParityError", "run_export"]

log = logging.getLogger(__name__)

INPUT_NAME = "images"
INSTALL_HINT = "pip install onnx onnxruntime"
# Known warnings of the TorchScript exporter: its deprecation notice and a constant-folding
# note. Its TracerWarnings (silenced too) say that the models' input-shape checks become
# constants of the graph; the parity check runs the graph at a second size where the size is
# dynamic, so a wrongly frozen value would fail there.
QUIET_WARNINGS = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
    "Constant folding - Only steps=1",
)


class ParityError(ValueError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


class DecodedYOLO(nn.Module):
    """A detector followed by :func:`yolo.converter.decode`, as one exportable module.

    ``images`` ``[N, 3, H, W]`` RGB in [0, 1] -> ``boxes`` ``[N, P, 4]`` normalised xyxy (not
    clipped) and ``scores`` ``[N, P, C]`` = objectness * class probability. ``anchors``
    ``[A, 2]`` in grid cells: a box is ``exp(tw) * anchor_w / (W/32)`` of the image wide.
    """

    def __init__(self, model: nn.Module, anchors: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("anchors", anchors.detach().clone().float())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, objectness, class_probs = decode(self.model(images), self.anchors)
        return boxes, objectness.unsqueeze(-1) * class_probs  # [N, P, 1] * [N, P, C]


def import_onnx():
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"export needs the onnx package: {INSTALL_HINT}") from error
    return onnx


def output_names(decoded: bool) -> tuple[str, ...]:
    return ("boxes", "scores") if decoded else ("raw",)


def dynamic_axes(config: ExportConfig) -> dict[str, dict[int, str]]:
    """Names of the dynamic axes of the input and every output (the TorchScript exporter's
    ``dynamic_axes``; also the names :func:`annotate` declares on the outputs)."""
    batch = {0: "batch"} if config.dynamic else {}
    if not config.dynamic_size:
        return {name: batch for name in (INPUT_NAME, *output_names(config.decode)) if batch}
    axes = {INPUT_NAME: {**batch, 2: "height", 3: "width"}}
    if config.decode:
        return {**axes, "boxes": {**batch, 1: "predictions"}, "scores": {**batch, 1: "predictions"}}
    return {**axes, "raw": {**batch, 2: "grid_h", 3: "grid_w"}}


def _export_torchscript(module: nn.Module, example: torch.Tensor, config: ExportConfig):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=config.opset,
            input_names=[INPUT_NAME],
            output_names=list(output_names(config.decode)),
            dynamic_axes=dynamic_axes(config) or None,
            do_constant_folding=True,
        )
    return import_onnx().load_from_string(buffer.getvalue())


def _export_dynamo(module: nn.Module, example: torch.Tensor, config: ExportConfig):
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as error:
        raise ImportError("--exporter dynamo needs onnxscript: pip install onnxscript") from error
    dims: dict[int, torch.export.Dim] = {0: torch.export.Dim("batch")} if config.dynamic else {}
    if config.dynamic_size:
        dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    program = torch.onnx.export(
        module,
        (example,),
        None,
        dynamo=True,
        opset_version=config.opset,
        input_names=[INPUT_NAME],
        output_names=list(output_names(config.decode)),
        dynamic_shapes=(dims,) if dims else None,
        external_data=False,
        verbose=False,
    )
    return program.model_proto


def build_metadata(model: nn.Module, classes, anchors: torch.Tensor, config: ExportConfig):
    """The metadata_props a consumer needs to decode and label the outputs (all strings)."""
    if config.decode:
        outputs = (
            "boxes [N, P, 4] xyxy normalised to [0, 1] (not clipped); scores [N, P, C] = "
            "objectness * class probability; P = (H/32)*(W/32)*A, index (row*W/32 + col)*A + a"
        )
    else:
        outputs = (
            "raw [N, A*(5+C), H/32, W/32], channel a*(5+C)+k, k = tx, ty, tw, th, to, then C "
            "class logits: sigmoid(tx, ty, to), box width exp(tw) * anchor_w / (W/32) of the "
            "image (height alike), softmax over classes"
        )
    return {
        "model": str(getattr(model, "backbone_name", config.model)),
        "classes": json.dumps(list(classes)),
        "anchors": json.dumps(anchors.tolist()),
        "anchors_format": (
            "[A, 2] (width, height) in grid cells (stride 32): "
            "box width = exp(tw) * anchor_w / grid_w"
        ),
        "input": f"{INPUT_NAME} [N, 3, H, W] float32 RGB in [0, 1], H and W multiples of 32",
        "outputs": outputs,
        "img_size": str(config.img_size),
    }


def check_shapes(config: ExportConfig) -> list[tuple[int, int, int, int]]:
    """Input shapes the parity check runs: the example's, plus one exercising dynamic axes."""
    size, batch = config.img_size, config.batch_size
    shapes = [(batch, 3, size, size)]
    if config.dynamic or config.dynamic_size:
        other_batch = batch + 1 if config.dynamic else batch
        other_size = (size + 32, size + 64) if config.dynamic_size else (size, size)
        shapes.append((other_batch, 3, *other_size))
    return shapes


def check_parity(
    path: Path, module: nn.Module, shapes, names: tuple[str, ...], tolerance: float
) -> dict[str, float] | None:
    """Run the ONNX file with onnxruntime and ``module`` with PyTorch on seeded random images.

    Returns the largest absolute difference per output (None when onnxruntime is missing);
    raises :class:`ParityError` when ``max |onnx - torch| > tolerance * (1 + max |torch|)`` for
    an output: float32 rounding grows with the size of the activations, so the bound scales with
    the output's largest value (untrained ResNet-101s reach 1e5), while an export bug (a wrong
    reorg order, a size frozen into the graph) is off by the whole scale.
    """
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: parity check skipped (%s)", INSTALL_HINT)
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = dict.fromkeys(names, 0.0)
    for shape in shapes:
        images = torch.rand(shape, generator=generator)
        with torch.no_grad():
            expected = module(images)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(list(names), {INPUT_NAME: images.numpy()})
        for name, want, have in zip(names, expected, got, strict=True):
            diff = compare_output(name, have, want.numpy(), tolerance, shape)
            worst[name] = max(worst[name], diff)
    return worst


def compare_output(name: str, have: np.ndarray, want: np.ndarray, tolerance: float, shape) -> float:
    """Max ``|have - want|`` (onnxruntime vs PyTorch) of one output; :class:`ParityError` on
    another shape, on inf/NaN in other places, or past the tolerance (see :func:`check_parity`)."""
    if have.shape != want.shape:
        raise ParityError(f"{name} has shape {have.shape} in onnxruntime, {want.shape} in PyTorch")
    finite = np.isfinite(want)
    if not np.array_equal(np.isfinite(have), finite):
        raise ParityError(f"{name}: onnxruntime and PyTorch have inf/NaN in different places")
    diff = float(np.abs(have - want)[finite].max(initial=0.0))
    scale = 1.0 + float(np.abs(want[finite]).max(initial=0.0))
    if diff > tolerance * scale:
        raise ParityError(
            f"onnxruntime's {name} differs from PyTorch's by up to {diff:.3g} on input {shape}, "
            f"more than --tolerance {tolerance:g} x {scale:.3g} (1 + the largest |value|): try "
            "another --opset or --exporter, or raise --tolerance"
        )
    return diff


def load_for_export(config: ExportConfig):
    """``(module to export, model, classes, anchors, config)`` from the configured weights; the
    config's ``img_size`` is the weights' evaluation size unless ``--img-size`` gave one."""
    require_weights(config)
    model, classes, anchors, img_size = load_trained_model(
        config.weights,
        model_name=config.model,
        classes_file=config.classes,
        anchors_file=config.anchors,
    )
    model = model.cpu().eval()
    module = DecodedYOLO(model, anchors).eval() if config.decode else model
    config = dataclasses.replace(config, img_size=config.img_size or img_size)
    return module, model, classes, anchors, config


def output_shapes(config: ExportConfig, num_anchors: int, num_classes: int) -> dict:
    """Shape of every output for the example input ``[B, 3, S, S]``."""
    batch, grid = config.batch_size, config.img_size // 32
    if not config.decode:
        return {"raw": (batch, num_anchors * (5 + num_classes), grid, grid)}
    predictions = grid * grid * num_anchors
    return {"boxes": (batch, predictions, 4), "scores": (batch, predictions, num_classes)}


def annotate(proto, model: nn.Module, classes, anchors: torch.Tensor, config: ExportConfig):
    """Add the metadata and declare the outputs' shapes: sizes where static, the names of
    :func:`dynamic_axes` where dynamic (the TorchScript exporter leaves decode's outputs with
    made-up names even where the size is fixed)."""
    props = {prop.key: prop.value for prop in proto.metadata_props}
    props.update(build_metadata(model, classes, anchors, config))
    import_onnx().helper.set_model_props(proto, props)
    shapes = output_shapes(config, len(anchors), len(classes))
    axes = dynamic_axes(config)
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(shapes[output.name]):
            name = axes.get(output.name, {}).get(axis)
            if name:
                dims.add().dim_param = name
            else:
                dims.add().dim_value = size


def save_checked(proto, module: nn.Module, config: ExportConfig) -> dict[str, float] | None:
    """Write ``proto`` to ``config.out`` through a temp file in the same folder that is checked
    (ONNX checker, then parity with onnxruntime when ``config.check``) before ``os.replace``;
    a failure leaves no file. Returns :func:`check_parity`'s differences (None: unchecked)."""
    onnx = import_onnx()
    out = Path(config.out)
    worst = None
    try:
        with atomic_path(out) as tmp:
            onnx.save(proto, str(tmp))
            onnx.checker.check_model(str(tmp))
            if config.check:
                names = output_names(config.decode)
                worst = check_parity(tmp, module, check_shapes(config), names, config.tolerance)
    except ParityError as error:
        raise ParityError(f"{out} not written: {error}") from None
    return worst


def export_release(config: ExportConfig) -> dict:
    """``--format pt|safetensors``: a checkpoint of this project as the file to share (weights,
    classes, anchors, config; no optimizer state). Returns ``out`` and ``bytes``."""
    require_weights(config)
    path = find_weights(config.weights).path
    if path.suffix == ".weights" or path.name.startswith("darknet19_448"):
        raise ValueError(
            f"--format {config.format} takes a checkpoint of this project (.pt or .safetensors); "
            f"{config.weights} is darknet's weights file, which is shared as it is"
        )
    out = Path(config.out)
    out = out.with_suffix(f".{config.format}") if out.suffix == ".onnx" else out
    checkpoint = load_checkpoint(path)
    if config.format == "safetensors":
        save_safetensors(checkpoint, out)
    else:
        save_checkpoint(release_checkpoint(checkpoint), out)
    size = out.stat().st_size
    weights_bytes = sum(v.numel() * v.element_size() for v in checkpoint["model"].values())
    log.info("%s: %.1f MB (the weights alone: %.1f MB)", out, size / 1e6, weights_bytes / 1e6)
    return {"out": str(out), "bytes": size}


def run_export(config: ExportConfig) -> dict:
    """Export ``config.weights`` to ``config.out`` (ONNX, or a release file with ``--format``);
    returns a summary dict with ``out``, ``bytes``, ``outputs``, ``export_s`` and
    ``max_abs_diff`` (per output, or None)."""
    if config.format != "onnx":
        return export_release(config)
    import_onnx()
    module, model, classes, anchors, config = load_for_export(config)
    example = torch.rand(config.batch_size, 3, config.img_size, config.img_size)
    exporter = _export_dynamo if config.exporter == "dynamo" else _export_torchscript
    log.info("%s exporter, opset %d", config.exporter, config.opset)
    start = time.perf_counter()
    with torch.no_grad():
        proto = exporter(module, example, config)
    export_s = time.perf_counter() - start
    annotate(proto, model, classes, anchors, config)
    worst = save_checked(proto, module, config)
    if worst is not None:
        diffs = ", ".join(f"{name} {value:.2e}" for name, value in worst.items())
        log.info("onnxruntime vs PyTorch, max abs diff: %s", diffs)
    out, names = Path(config.out), output_names(config.decode)
    size = out.stat().st_size
    log.info("%s: %.1f MB, outputs %s, exported in %.1f s", out, size / 1e6, names, export_s)
    return {
        "out": str(out),
        "bytes": size,
        "outputs": names,
        "export_s": export_s,
        "max_abs_diff": worst,
    }
