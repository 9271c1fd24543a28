import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import detect
import yolo.detect as engine
import yolo.video as video
from utils.anchors import default_anchors
from utils.data import VOC_CLASSES
from utils.transforms import build_eval_transform, unletterbox_boxes
from utils.voc import boxes_to_voc_pixels
from yolo.checkpoint import FORMAT
from yolo.darknet import save_darknet_weights
from yolo.model import build_model
from yolo.runtime import Runtime
from yolo.source import Source, resolve_source

IMG_SIZE = "128"


CPU = Runtime(torch.device("cpu"))


def save_checkpoint(model: nn.Module, path: Path, classes: list[str]) -> Path:
    torch.save(
        {
            "model": model.state_dict(),
            "config": {"model": "tiny"},
            "classes": classes,
            "anchors": default_anchors().tolist(),
            "format": FORMAT,
        },
        path,
    )
    return path


def build_confident_tiny(num_classes: int) -> nn.Module:
    """A random "tiny" model whose head is biased to confident boxes, so there is much to draw."""
    model = build_model("tiny", num_classes=num_classes, num_anchors=5).eval()
    with torch.no_grad():
        bias = model.head.conv.bias.view(5, 5 + num_classes)  # [A*(5+C)] -> [A, 5+C]
        bias[:, 4] = 3.0
        bias[:, 5:] = 3.0 * torch.randn(5, num_classes)
    return model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_confident_tiny(3)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    return save_checkpoint(model, path, ["cat", "dog", "person"])


def write_image(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def run(weights: Path, source, out: Path, *extra: str) -> int:
    sources = [str(s) for s in (source if isinstance(source, list) else [source])]
    argv = ["--weights", str(weights), "--source", *sources, "--out", str(out)]
    return detect.main([*argv, "--img-size", IMG_SIZE, "--device", "cpu", *extra])


def read_json(out: Path) -> dict:
    return json.loads((out / "detections.json").read_text())


def test_help_exits_zero_and_names_the_display_threshold(capsys):
    with pytest.raises(SystemExit) as exit_info:
        detect.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--weights", "--source", "--classes", "--max-frames", "--show"):
        assert flag in text
    assert "display threshold" in text


def test_missing_weights_or_source_is_a_clear_error(tmp_path, tiny_checkpoint, caplog):
    write_image(tmp_path / "x.png", 8, 8, 0)
    assert detect.main(["--source", str(tmp_path)]) == 1
    assert "--weights is required" in caplog.text
    assert detect.main(["--weights", str(tiny_checkpoint)]) == 1
    assert "--source is required" in caplog.text
    assert run(tmp_path / "none.pt", tmp_path, tmp_path / "out") == 1
    assert "none.pt not found" in caplog.text
    with pytest.raises(SystemExit):
        detect.main(["--weights", "x.pt", "--source", "0", "--img-size", "100"])


def test_folder_gives_one_annotated_image_per_input_and_skips_broken_files(
    tmp_path, tiny_checkpoint, caplog
):
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    sizes = {"a.jpg": (160, 96), "b.png": (96, 200), "c.jpeg": (128, 128)}
    for seed, (name, (width, height)) in enumerate(sizes.items()):
        write_image(folder / name, width, height, seed)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored: not an image suffix")

    assert run(tiny_checkpoint, folder, out, "--conf-threshold", "0.3", "--batch-size", "2") == 0

    written = sorted(p.name for p in out.iterdir())
    assert written == ["a.jpg", "b.png", "c.jpg", "detections.json"]
    for name, stem_out in (("a.jpg", "a.jpg"), ("b.png", "b.png"), ("c.jpeg", "c.jpg")):
        with Image.open(out / stem_out) as drawn:
            assert drawn.size == sizes[name]
    document = read_json(out)
    assert document["skipped"] == 1 and document["classes"] == ["cat", "dog", "person"]
    by_name = {Path(r["image"]).name: r for r in document["results"]}
    assert set(by_name) == {"a.jpg", "b.png", "c.jpeg", "broken.jpg"}
    assert "error" in by_name["broken.jpg"] and "broken.jpg" in caplog.text
    assert sum(len(by_name[name]["detections"]) for name in sizes) > 0
    for name, (width, height) in sizes.items():
        result = by_name[name]
        assert (result["width"], result["height"]) == (width, height)
        for det in result["detections"]:
            assert det["score"] >= 0.3 and det["class"] == document["classes"][det["class_id"]]
            expected = np.array(det["box"]) * [width, height, width, height] + [1, 1, 0, 0]
            np.testing.assert_allclose(det["box_px"], expected, atol=0.01)  # VOC pixel frame


def test_darknet_weights_give_the_same_detections_as_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = build_confident_tiny(20)
    checkpoint = save_checkpoint(model, tmp_path / "tiny.pt", list(VOC_CLASSES))
    darknet = tmp_path / "tiny.weights"
    save_darknet_weights(model, darknet)
    write_image(tmp_path / "photo.jpg", 150, 110, seed=3)
    threshold = ("--conf-threshold", "0.3")
    assert run(checkpoint, tmp_path / "photo.jpg", tmp_path / "pt", *threshold) == 0
    assert run(darknet, tmp_path / "photo.jpg", tmp_path / "dn", "--model", "tiny", *threshold) == 0
    from_pt, from_darknet = read_json(tmp_path / "pt"), read_json(tmp_path / "dn")
    assert from_darknet["classes"] == list(VOC_CLASSES)
    dets_pt = from_pt["results"][0]["detections"]
    dets_darknet = from_darknet["results"][0]["detections"]
    assert len(dets_pt) > 0 and [d["class"] for d in dets_pt] == [d["class"] for d in dets_darknet]
    for a, b in zip(dets_pt, dets_darknet, strict=True):
        np.testing.assert_allclose(a["box_px"], b["box_px"], atol=0.05)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_boxes_to_voc_pixels_known_values():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.505, 0.51]])
    pixels = boxes_to_voc_pixels(boxes, width=200, height=100)
    expected = torch.tensor([[21.0, 21, 100, 100], [1, 1, 200, 100], [101, 51, 101, 51]])
    torch.testing.assert_close(pixels, expected)  # the last: one pixel, xmin == xmax


def test_detections_to_dicts_known_values():
    dets = torch.tensor([[0.25, 0.5, 0.75, 1.0, 0.9, 1.0], [0.0, 0.1, 0.2, 0.3, 0.4, 0.0]])
    found = engine.detections_to_dicts(dets, 640, 480, ("cat", "dog"))
    assert found[0] == {
        "class": "dog",
        "class_id": 1,
        "score": 0.9,
        "box_px": [161.0, 241.0, 480.0, 480.0],
        "box": [0.25, 0.5, 0.75, 1.0],
    }
    assert found[1]["class"] == "cat" and found[1]["box_px"] == [1.0, 49.0, 128.0, 144.0]
    assert engine.detections_to_dicts(torch.zeros(0, 6), 10, 10, ("cat",)) == []


class ShapeRecorder(nn.Module):
    """Stands in for a model: records its input and returns an output of the right shape."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images)
        n, _, h, w = images.shape
        return torch.zeros(n, 5 * 7, h // 32, w // 32)


def test_detections_are_mapped_back_to_each_original_image(tmp_path, monkeypatch):
    fixed = torch.tensor([[0.1, 0.25, 0.6, 0.75, 0.8, 1.0]])
    monkeypatch.setattr(engine, "postprocess", lambda raw, *a, **k: [fixed] * len(raw))
    paths = [tmp_path / "wide.png", tmp_path / "tall.png"]
    write_image(paths[0], 320, 160, seed=0)
    write_image(paths[1], 90, 300, seed=1)
    model = ShapeRecorder()
    detector = engine.Detector(model, default_anchors(), ("a", "b"), 96, 0.3, 0.45, CPU)
    results = engine.detect_images(detector, paths, batch_size=1, out_dir=None)
    assert [tuple(x.shape) for x in model.inputs] == [(1, 3, 96, 96)] * 2
    assert all(x.min() >= 0.0 and x.max() <= 1.0 for x in model.inputs)
    assert results[0]["detections"][0]["box_px"] == [33.0, 41.0, 192.0, 120.0]
    assert results[1]["detections"][0]["box_px"] == [10.0, 76.0, 54.0, 225.0]
    assert results[1]["detections"][0]["class"] == "b"


def test_letterbox_feeds_darknets_letterbox_and_maps_boxes_back(tmp_path, monkeypatch):
    in_network = torch.tensor([[0.1, 0.3, 0.6, 0.7, 0.8, 1.0], [0.0, 0.0, 1.0, 0.1, 0.7, 0.0]])
    monkeypatch.setattr(engine, "postprocess", lambda raw, *a, **k: [in_network] * len(raw))
    path = tmp_path / "wide.png"
    write_image(path, 320, 160, seed=0)
    model = ShapeRecorder()
    detector = engine.Detector(
        model,
        default_anchors(),
        ("a", "b"),
        96,
        0.3,
        0.45,
        Runtime(torch.device("cpu")),
        letterbox=True,
    )
    dets = detector.detect([engine.load_image(path)])[0]
    image = model.inputs[0][0]  # [3, 96, 96]: 320 x 160 -> 96 x 48 between two grey bands
    assert (image[:, :24] == 0.5).all() and (image[:, 72:] == 0.5).all()
    expected = unletterbox_boxes(in_network[:, :4], 320, 160, 96).clamp(0, 1)
    torch.testing.assert_close(dets[:, :4], expected)
    torch.testing.assert_close(dets[0, :4], torch.tensor([0.1, 0.1, 0.6, 0.9]))
    assert dets[1, 1] == 0.0 and dets[1, 3] == 0.0  # in the band above the image: clipped
    torch.testing.assert_close(dets[:, 4:], in_network[:, 4:])


def test_letterbox_flag_is_recorded(tmp_path, tiny_checkpoint):
    write_image(tmp_path / "x.png", 100, 60, 0)
    assert run(tiny_checkpoint, tmp_path / "x.png", tmp_path / "out", "--letterbox") == 0
    document = read_json(tmp_path / "out")
    assert document["letterbox"] is True and len(document["results"]) == 1


def test_preprocess_is_a_plain_resize_to_rgb_in_unit_range():
    image = Image.fromarray(np.full((50, 80, 3), (255, 0, 51), dtype=np.uint8))
    batch = engine.preprocess([image, image.convert("L").convert("RGB")], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0, :, 10, 10], torch.tensor([1.0, 0.0, 0.2]))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), np.uint8))
    expected, _ = build_eval_transform(64)(photo, {})
    torch.testing.assert_close(engine.preprocess([photo], 64)[0], expected, rtol=0, atol=0)


def test_resolve_source(tmp_path):
    assert resolve_source(["0"]) == Source("webcam", webcam=0)
    (tmp_path / "clip.MP4").write_bytes(b"")
    assert resolve_source([str(tmp_path / "clip.MP4")]).kind == "video"
    write_image(tmp_path / "x.png", 8, 8, 0)
    with pytest.raises(ValueError, match="one video file on its own"):
        resolve_source([str(tmp_path / "clip.MP4"), str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        resolve_source([str(tmp_path / "missing.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        resolve_source([str(tmp_path / "empty")])
    images = resolve_source([str(tmp_path), str(tmp_path / "x.png")])
    assert images.kind == "images" and images.paths == (tmp_path / "x.png",) * 2


def test_output_paths_keep_stems_and_never_overwrite_inputs(tmp_path):
    paths = [Path("a/x.png"), Path("b/x.png"), Path("c/x.JPEG"), Path("y.bmp")]
    names = [p.name for p in engine.output_paths(paths, tmp_path)]
    assert names == ["x.png", "x_1.png", "x.jpg", "y.jpg"]
    write_image(tmp_path / "z.png", 8, 8, 0)
    with pytest.raises(ValueError, match="overwrite the input"):
        engine.output_paths([tmp_path / "z.png"], tmp_path)


class FakeCapture:
    """A webcam: ``frames`` frames, then Ctrl-C (or the end of the stream)."""

    def __init__(self, frames: int, *, interrupt: bool = True, opened: bool = True) -> None:
        self.frames, self.interrupt, self.opened = frames, interrupt, opened
        self.reads, self.released = 0, False

    def isOpened(self) -> bool:
        return self.opened

    def get(self, prop) -> float:
        return 0.0  # webcams often report no frame rate

    def read(self):
        if self.reads == self.frames:
            if self.interrupt:
                raise KeyboardInterrupt
            return False, None
        self.reads += 1
        return True, np.full((120, 160, 3), 20 * self.reads, dtype=np.uint8)

    def release(self) -> None:
        self.released = True


def test_read_frames_chunks_and_stops_at_max_frames():
    chunks = video.read_frames(FakeCapture(7, interrupt=False), 3, None)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert [len(c) for c in video.read_frames(FakeCapture(7, interrupt=False), 3, 5)] == [3, 2]


def count_frames(cv2, path: Path) -> tuple[int, tuple[int, int], float]:
    capture = cv2.VideoCapture(str(path))
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    fps, count = capture.get(cv2.CAP_PROP_FPS), 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count, size, fps


def test_video_file_gives_an_annotated_video_and_a_result_per_frame(tmp_path, tiny_checkpoint):
    cv2 = pytest.importorskip("cv2")
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 96))
    for i in range(5):
        writer.write(np.full((96, 160, 3), 50 * i, dtype=np.uint8))
    writer.release()
    out = tmp_path / "out"
    assert run(tiny_checkpoint, clip, out, "--batch-size", "2") == 0
    assert count_frames(cv2, out / "clip.mp4") == (5, (160, 96), 10.0)
    document = read_json(out)
    assert [r["frame"] for r in document["results"]] == [0, 1, 2, 3, 4]
    assert document["results"][2]["time_s"] == pytest.approx(0.2)
    assert {(r["width"], r["height"]) for r in document["results"]} == {(160, 96)}
    assert run(tiny_checkpoint, clip, tmp_path / "short", "--max-frames", "3") == 0
    assert len(read_json(tmp_path / "short")["results"]) == 3


def test_webcam_stops_cleanly_on_ctrl_c(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    cv2 = pytest.importorskip("cv2")
    captures = []

    def fake_capture(index):
        assert index == 0
        captures.append(FakeCapture(3))
        return captures[-1]

    monkeypatch.setattr(cv2, "VideoCapture", fake_capture)
    out = tmp_path / "out"
    assert run(tiny_checkpoint, "0", out) == 0
    assert captures[0].released and "interrupted" in caplog.text
    document = read_json(out)
    assert document["interrupted"] and len(document["results"]) == 3
    monkeypatch.undo()
    assert count_frames(cv2, out / "webcam0.mp4")[:2] == (3, (160, 120))


def test_webcam_that_cannot_open_is_a_clear_error(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    cv2 = pytest.importorskip("cv2")
    monkeypatch.setattr(cv2, "VideoCapture", lambda index: FakeCapture(0, opened=False))
    assert run(tiny_checkpoint, "1", tmp_path / "out") == 1
    assert "cannot open webcam 1" in caplog.text


def test_show_without_a_display_goes_on_without_a_window(monkeypatch, caplog):
    image = Image.new("RGB", (32, 32))
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    viewer = video.Viewer(True, wait_ms=1)
    viewer.show(image)
    assert not viewer.enabled and not viewer.stop_requested and "no display" in caplog.text


def test_show_stops_on_q_and_turns_off_when_opencv_has_no_gui(monkeypatch, caplog):
    cv2 = pytest.importorskip("cv2")
    monkeypatch.setenv("DISPLAY", ":99")
    shown = []
    monkeypatch.setattr(cv2, "imshow", lambda name, frame: shown.append(frame.shape))
    monkeypatch.setattr(cv2, "waitKey", lambda ms: ord("q"))
    monkeypatch.setattr(cv2, "destroyAllWindows", lambda: None)
    viewer = video.Viewer(True, wait_ms=1)
    viewer.show(Image.new("RGB", (40, 30)))
    assert shown == [(30, 40, 3)] and viewer.stop_requested

    def no_gui(name, frame):
        raise cv2.error("The function is not implemented")

    monkeypatch.setattr(cv2, "imshow", no_gui)
    viewer = video.Viewer(True, wait_ms=1)
    viewer.show(Image.new("RGB", (40, 30)))
    assert not viewer.enabled and "cannot open a window" in caplog.text
