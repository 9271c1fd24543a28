"""The Python API as a user calls it: load_detector, Results, torch.hub, release files."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export
from tests.test_detect import build_confident_tiny
from yolo import load_detector
from yolo.api import UnknownWeightsError, UnsupportedWeightsError
from yolo.checkpoint import FORMAT, load_checkpoint, save_checkpoint, training_checkpoint
from yolo.config import TrainConfig
from yolo.darknet import save_darknet_weights
from yolo.epoch import TrainState
from yolo.model import build_model
from yolo.predict import ImageInputError
from yolo.release import load_safetensors, release_checkpoint
from yolo.weights import DARKNET_RELEASES, MIRROR_ENV

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "person"]


def confident_tiny(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_confident_tiny(num_classes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint (with optimizer state) of a tiny 3-class model evaluated at 96."""
    model = confident_tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.rand(1, 3, 64, 64)).sum().backward()
    optimizer.step()  # the optimizer now holds two moments per weight
    state = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": {"model": "tiny", "eval_img_size": 96},
        "classes": CLASSES,
        "anchors": [[1.0, 1.5], [2.0, 3.0], [4.0, 2.0], [5.0, 6.0], [8.0, 8.0]],
        "anchors_unit": "grid",
        "state": {"epoch": 3, "best_map": 0.5},
    }
    return save_checkpoint(state, tmp_path_factory.mktemp("run") / "last.pt")


def photo(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_paths_pil_images_and_tensors_of_mixed_sizes_in_one_call(tmp_path, checkpoint):
    detector = load_detector(checkpoint, device="cpu", conf_threshold=0.3)
    wide = photo(tmp_path / "wide.png", 200, 100, 0)
    pil = Image.open(photo(tmp_path / "tall.png", 60, 150, 1))
    tensor = torch.from_numpy(np.array(Image.open(wide))).permute(2, 0, 1)  # [3, H, W] uint8
    results = detector([wide, pil, tensor])
    assert [r.image_size for r in results] == [(100, 200), (150, 60), (100, 200)]
    assert detector.img_size == 96  # the checkpoint's evaluation size
    for result in results:
        height, width = result.image_size
        assert len(result) > 0
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        torch.testing.assert_close(result.boxes_px, result.boxes * scale)
        assert (result.boxes_px[:, 2:] <= scale[:2]).all() and (result.boxes_px >= 0).all()
        assert result.labels.dtype == torch.int64 and result.scores.shape == result.labels.shape
        assert list(result.names) == [CLASSES[i] for i in result.labels.tolist()]
        assert (result.scores[:-1] >= result.scores[1:]).all() and (result.scores > 0.3).all()
    # the same image as a path and as a tensor: the same detections
    torch.testing.assert_close(results[0].boxes_px, results[2].boxes_px)
    # the same path as detect.py's engine: one inference path
    torch.testing.assert_close(results[1].detections, detector.detect([pil.convert("RGB")])[0])
    drawn = detector.draw(results[0])
    assert drawn.size == (200, 100) and drawn.tobytes() != Image.open(wide).tobytes()


def test_a_single_input_is_a_batch_of_one(tmp_path, checkpoint):
    detector = load_detector(str(checkpoint), device="cpu")
    assert len(detector(photo(tmp_path / "x.jpg", 64, 64, 2))) == 1


def test_bad_inputs_raise_typed_errors_that_say_what_to_do(tmp_path, checkpoint):
    with pytest.raises(UnknownWeightsError, match="yolov2-voc, yolov2-tiny-voc, yolov2"):
        load_detector("yolov2-vocc")
    other = tmp_path / "model.onnx"
    other.write_bytes(b"not weights")
    with pytest.raises(UnsupportedWeightsError, match=r"\.safetensors.*\.weights"):
        load_detector(other)
    detector = load_detector(checkpoint, device="cpu")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageInputError, match=r"image 1 \(.*broken.jpg\)"):
        detector([photo(tmp_path / "ok.png", 32, 32, 0), broken])
    with pytest.raises(ImageInputError, match=r"image 0: a tensor must be uint8 \[3, H, W\]"):
        detector([torch.rand(3, 32, 32)])
    with pytest.raises(ImageInputError, match="image 0: a int"):
        detector([7])


def cache_release(torch_home: Path, name: str) -> torch.nn.Module:
    """Write a random model of release ``name`` where torch.hub's cache keeps it."""
    release = DARKNET_RELEASES[name]
    model = build_model(release.model, len(release.classes), len(release.anchors)).eval()
    path = torch_home / "hub" / "checkpoints" / release.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_darknet_weights(model, path)
    assert path.stat().st_size == release.num_bytes
    return model


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache_release(tmp_path / "torch", "yolov2-voc")
    monkeypatch.chdir(tmp_path)
    photo(tmp_path / "photo.jpg", 320, 240, 3)
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    assert Image.open(tmp_path / "photo-boxes.jpg").size == (320, 240)


def test_torch_hub_loads_a_cached_release_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(MIRROR_ENV, (tmp_path / "no-mirror").as_uri())  # no download possible
    expected = cache_release(tmp_path / "torch", "yolov2-tiny-voc")
    model = torch.hub.load(str(REPO), "yolov2_tiny_voc", source="local", pretrained=True)
    assert not model.training
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_torch_hub_without_the_weights_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(MIRROR_ENV, (tmp_path / "no-mirror").as_uri())
    with pytest.raises(ConnectionError) as error:
        torch.hub.load(str(REPO), "yolov2_voc", source="local", pretrained=True)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "yolov2-voc.weights") in message


def test_release_files_hold_the_weights_alone_and_load_everywhere(tmp_path, checkpoint, caplog):
    full = load_checkpoint(checkpoint)
    weights_bytes = sum(v.numel() * v.element_size() for v in full["model"].values())
    assert checkpoint.stat().st_size > 2 * weights_bytes  # AdamW's moments ride along
    for fmt in ("pt", "safetensors"):
        out = tmp_path / "share.onnx"
        assert export.main(["--weights", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
        shared = out.with_suffix(f".{fmt}")
        assert shared.stat().st_size < 1.01 * weights_bytes
        loaded = load_checkpoint(shared)
        assert "optimizer" not in loaded and loaded["classes"] == CLASSES
        for key, value in full["model"].items():
            assert torch.equal(loaded["model"][key], value), key
        detector = load_detector(shared, device="cpu")
        assert detector.class_names == tuple(CLASSES) and detector.img_size == 96
    meta = load_safetensors(tmp_path / "share.safetensors")
    assert meta["anchors"] == full["anchors"] and meta["config"] == full["config"]


def test_the_release_form_drops_what_only_a_resume_reads():
    model = confident_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    config = TrainConfig(model="tiny", epochs=1)
    full = training_checkpoint(
        model, optimizer, scaler, TrainState(), config, CLASSES, torch.ones(5, 2)
    )
    release = release_checkpoint(full)
    assert release["release"] and not {"optimizer", "scaler", "rng"} & release.keys()
    assert release["model"] is full["model"] and release["config"] == full["config"]
