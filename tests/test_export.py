"""ONNX export: onnxruntime reproduces PyTorch (raw head and decoded) for tiny, darknet19 and a
ResNet, at other batch sizes and image sizes where those axes are dynamic; the metadata; the
atomic write; the errors a user meets."""

import io
import json
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import export
import yolo.export as engine
from utils.anchors import default_anchors
from yolo.checkpoint import FORMAT
from yolo.config import ExportConfig
from yolo.converter import decode
from yolo.darknet import save_darknet_weights
from yolo.model import build_model, darknet_reorg

CLASSES = ["cat", "dog", "person"]
# onnxruntime and PyTorch sum convolutions in different orders: float32 rounding only.
ATOL = 5e-5


def build_confident(name: str, num_classes: int, seed: int) -> nn.Module:
    """A random model whose head predicts confident boxes, so the scores compared are not ~0."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, num_anchors=5).eval()
    with torch.no_grad():
        bias = model.head.conv.bias.view(5, 5 + num_classes)  # [A*(5+C)] -> [A, 5+C]
        bias[:, 4] = 2.0
        bias[:, 5:] = 2.0 * torch.randn(5, num_classes)
    return model


def save_checkpoint(model: nn.Module, path: Path, name: str) -> Path:
    state = {
        "model": model.state_dict(),
        "config": {"model": name},
        "classes": CLASSES,
        "anchors": default_anchors().tolist(),
        "format": FORMAT,
    }
    torch.save(state, path)
    return path


def pytorch_outputs(model: nn.Module, images: torch.Tensor, decoded: bool) -> list[np.ndarray]:
    with torch.no_grad():
        raw = model(images)
    if not decoded:
        return [raw.numpy()]
    boxes, objectness, class_probs = decode(raw, default_anchors())
    return [boxes.numpy(), (objectness[..., None] * class_probs).numpy()]


def assert_parity(path: Path, model: nn.Module, shapes, decoded: bool) -> list[float]:
    """Run ``path`` with onnxruntime on random images of each shape; returns the max abs diffs."""
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = []
    for seed, shape in enumerate(shapes):
        images = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        got = session.run(None, {"images": images.numpy()})
        for have, want in zip(got, pytorch_outputs(model, images, decoded), strict=True):
            np.testing.assert_allclose(have, want, rtol=0, atol=ATOL)
            worst.append(float(np.abs(have - want).max()))
    return worst


def export_config(weights: Path, out: Path, **changes) -> ExportConfig:
    return ExportConfig(weights=str(weights), out=str(out), img_size=64, **changes)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny checkpoint exported with decode and a dynamic batch: (model, folder, summary)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("tiny")
    model = build_confident("tiny", len(CLASSES), seed=0)
    checkpoint = save_checkpoint(model, folder / "tiny.pt", "tiny")
    summary = engine.run_export(export_config(checkpoint, folder / "tiny.onnx"))
    return model, folder, summary


def test_help_lists_the_flags(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["export.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(export.__file__, run_name="__main__")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--weights", "--img-size", "--dynamic", "--no-decode", "--opset", "--no-check"):
        assert flag in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--img-size", "100"],
        ["--batch-size", "0"],
        ["--opset", "9"],
        ["--exporter", "tvm"],
        ["--exporter", "dynamo", "--dynamic-size"],
        ["--model", "yolov3"],
        ["--frobnicate"],
    ],
)
def test_bad_flags_exit_with_an_error(argv):
    with pytest.raises(SystemExit) as exit_info:
        export.main(argv)
    assert exit_info.value.code not in (0, None)


def test_missing_weights_is_a_clear_error(tmp_path, caplog):
    pytest.importorskip("onnx")
    assert export.main(["--out", str(tmp_path / "x.onnx")]) == 1
    assert "--weights is required" in caplog.text
    assert export.main(["--weights", str(tmp_path / "none.pt")]) == 1
    assert "none.pt not found" in caplog.text


def test_missing_onnx_names_the_install_command(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    assert export.main(["--weights", str(tmp_path / "none.pt")]) == 1
    assert "pip install onnx onnxruntime" in caplog.text


def test_check_without_onnxruntime_warns_and_skips(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert engine.check_parity(tmp_path / "x.onnx", nn.Identity(), [], ("raw",), 1e-3) is None
    assert "parity check skipped (pip install onnx onnxruntime)" in caplog.text


def test_tiny_decoded_matches_pytorch_at_batch_1_and_3(tiny_export):
    model, folder, summary = tiny_export
    assert summary["outputs"] == ("boxes", "scores")
    assert max(summary["max_abs_diff"].values()) < ATOL
    assert_parity(folder / "tiny.onnx", model, [(1, 3, 64, 64), (3, 3, 64, 64)], decoded=True)


def test_metadata_and_signature_let_a_consumer_decode(tiny_export):
    onnx = pytest.importorskip("onnx")
    _, folder, _ = tiny_export
    proto = onnx.load(folder / "tiny.onnx")
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    np.testing.assert_allclose(json.loads(meta["anchors"]), default_anchors().numpy())
    assert meta["anchors_format"] == (
        "[A, 2] (width, height) in grid cells (stride 32): box width = exp(tw) * anchor_w / grid_w"
    )
    assert meta["model"] == "tiny" and "xyxy" in meta["outputs"]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [dims(v) for v in proto.graph.input] == [["batch", 3, 64, 64]]
    assert [v.name for v in proto.graph.output] == ["boxes", "scores"]
    assert dims(proto.graph.output[0]) == ["batch", 2 * 2 * 5, 4]
    assert dims(proto.graph.output[1]) == ["batch", 2 * 2 * 5, len(CLASSES)]
    assert sorted(p.name for p in folder.iterdir()) == ["tiny.onnx", "tiny.pt"]  # no temp file


def test_darknet_reorg_exports_as_reshape_and_transpose():
    onnx = pytest.importorskip("onnx")

    class Reorg(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return darknet_reorg(x)

    buffer = io.BytesIO()
    axes = {"x": {0: "n", 1: "c", 2: "h", 3: "w"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(
            Reorg(),
            (torch.rand(1, 8, 4, 6),),
            buffer,
            dynamo=False,
            opset_version=ExportConfig().opset,
            input_names=["x"],
            dynamic_axes=axes,
        )
    graph = onnx.load_from_string(buffer.getvalue()).graph
    ops = {node.op_type for node in graph.node}
    assert {"Reshape", "Transpose"} <= ops and not ops & {"SpaceToDepth", "DepthToSpace"}
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 4, 6), (2, 12, 6, 2)]:
        x = torch.randn(shape)
        np.testing.assert_array_equal(session.run(None, {"x": x.numpy()})[0], darknet_reorg(x))


@pytest.mark.slow
def test_darknet19_weights_raw_head_matches_with_dynamic_size(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    weights = tmp_path / "yolov2-voc-synthetic.weights"
    save_darknet_weights(build_model("darknet19"), weights)
    out = tmp_path / "yolov2.onnx"
    config = export_config(weights, out, decode=False, dynamic_size=True)
    summary = engine.run_export(config)  # checks (1, 3, 64, 64) and (2, 3, 96, 128)
    assert summary["max_abs_diff"]["raw"] < ATOL
    graph = onnx.load(out, load_external_data=False).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # no custom op for reorg


@pytest.mark.slow
def test_resnet18_checkpoint_decoded_with_dynamic_size(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = build_confident("resnet18", len(CLASSES), seed=2)
    checkpoint = save_checkpoint(model, tmp_path / "resnet18.pt", "resnet18")
    config = export_config(checkpoint, tmp_path / "resnet18.onnx", dynamic_size=True)
    summary = engine.run_export(config)  # checks (1, 3, 64, 64) and (2, 3, 96, 128)
    assert max(summary["max_abs_diff"].values()) < ATOL
    # the graph decodes with the grid of its input: 3x4 cells here, not the example's 2x2
    shapes = [(1, 3, 64, 64), (2, 3, 96, 128)]
    assert_parity(tmp_path / "resnet18.onnx", model, shapes, decoded=True)


def test_failed_check_writes_nothing(tiny_export, tmp_path, caplog):
    _, folder, _ = tiny_export
    out = tmp_path / "out" / "tiny.onnx"
    argv = ["--weights", str(folder / "tiny.pt"), "--out", str(out), "--img-size", "64"]
    assert export.main([*argv, "--tolerance", "1e-12"]) == 1
    assert "differs from PyTorch" in caplog.text
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_dynamo_exporter_raw_head(tiny_export, tmp_path):
    pytest.importorskip("onnxscript")
    model, folder, _ = tiny_export
    out = tmp_path / "tiny-dynamo.onnx"
    config = export_config(folder / "tiny.pt", out, exporter="dynamo", decode=False)
    assert engine.run_export(config)["outputs"] == ("raw",)
    assert_parity(out, model, [(1, 3, 64, 64), (2, 3, 64, 64)], decoded=False)
