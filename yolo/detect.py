"""Detection on image files and folders, and the engine of ``detect.py`` (video files and
webcams go through :mod:`yolo.video`).

Images are resized to a square ``img_size`` as darknet validates (``resize_image``), or
letterboxed as darknet's ``letterbox_image`` with ``letterbox``; detected in small batches; and
the boxes are mapped back to each original image. Outputs in ``out``: an annotated copy of
every image (same stem) or an annotated mp4 for a video or webcam, and ``detections.json``,
where each detection has ``box``, normalised xyxy of the original image, and ``box_px``, the
same box in the VOC pixel frame: 1-based inclusive pixels as in VOC XML files,
``(x1 * W + 1, y1 * H + 1, x2 * W, y2 * H)`` (a box one pixel wide has xmin == xmax).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm import tqdm

from utils.fileio import atomic_open
from utils.transforms import build_eval_transform, unletterbox_boxes
from utils.visualize import draw_detections
from yolo.build import load_trained_model
from yolo.config import MODELS, flag
from yolo.nms import postprocess
from yolo.runtime import select_amp_dtype, select_device
from yolo.video import Viewer, detect_stream, video_output_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
JSON_NAME = "detections.json"
DOCUMENTED_SETTINGS = ("weights", "img_size", "letterbox", "conf_threshold", "nms_threshold")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class DetectConfig:
    """Detection on images, a folder, a video file or a webcam."""

    weights: str | None = flag(None, "checkpoint .pt of this project, or darknet .weights")
    source: tuple[str, ...] = flag(
        (), "image files and/or folders, one video file, or a webcam index such as 0"
    )
    model: str = flag("darknet19", f"model for darknet .weights files, one of {MODELS}")
    classes: str | None = flag(None, "classes file for .weights (a checkpoint has its own)")
    anchors: str | None = flag(None, "anchors JSON for .weights (a checkpoint has its own)")
    img_size: int = flag(416, "network input size (a multiple of 32)")
    letterbox: bool = flag(
        False,
        "resize as darknet's letterbox_image (aspect ratio kept, grey borders) instead of its "
        "plain resize_image",
    )
    conf_threshold: float = flag(
        0.25,
        "display threshold: detections scoring below it are neither drawn nor saved "
        "(mAP evaluation uses 0.005)",
    )
    nms_threshold: float = flag(0.45, "NMS IoU threshold")
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    amp: bool = flag(True, "half precision on CUDA")
    batch_size: int = flag(8, "images (or video frames) per forward pass")
    out: str = flag("model/detect", "output folder for annotated images/video and detections.json")
    show: bool = flag(False, "show results in a window (needs a display); q or Esc stops")
    max_frames: int | None = flag(None, "stop a video or webcam after this many frames")

    def __post_init__(self) -> None:
        checks = (
            (self.model in MODELS, f"--model {self.model!r}: choose one of {MODELS}"),
            (self.img_size > 0 and self.img_size % 32 == 0, "--img-size: use a multiple of 32"),
            (0.0 <= self.conf_threshold <= 1.0, "--conf-threshold: a score in [0, 1]"),
            (0.0 < self.nms_threshold <= 1.0, "--nms-threshold: an IoU in (0, 1]"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.max_frames is None or self.max_frames >= 1, "--max-frames must be >= 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class Source:
    """What ``--source`` names: ``kind`` is "images", "video" or "webcam"."""

    kind: str
    paths: tuple[Path, ...] = ()
    webcam: int | None = None


def resolve_source(items: Sequence[str]) -> Source:
    """Classify ``--source``: a webcam index, one video file, or image files and folders.

    A folder contributes its files with an image suffix (sorted, not recursive).
    """
    if len(items) == 1 and items[0].isdigit():
        return Source("webcam", webcam=int(items[0]))
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"--source {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--source {path}: no such file or folder")
    videos = [p for p in paths if p.suffix.lower() in VIDEO_SUFFIXES]
    if videos and len(paths) > 1:
        raise ValueError(f"--source: give one video file on its own, got {len(paths)} inputs")
    return Source("video", paths=tuple(paths)) if videos else Source("images", paths=tuple(paths))


def load_image(path: Path) -> Image.Image:
    """An RGB image, decoded now (so a broken file fails here), upright per its EXIF tag."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def preprocess(
    images: Sequence[Image.Image], img_size: int, *, letterbox: bool = False
) -> torch.Tensor:
    """PIL RGB images -> ``[N, 3, img_size, img_size]`` float RGB in [0, 1], exactly as the
    evaluation transform prepares them (darknet's resize, or its letterbox)."""
    transform = build_eval_transform(img_size, letterbox=letterbox)
    return torch.stack([transform(image, {})[0] for image in images])  # N x [3, S, S]


def boxes_to_voc_pixels(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[K, 4]`` normalised xyxy -> ``[K, 4]`` in the VOC pixel frame of a ``width`` x
    ``height`` image: ``(x1 W + 1, y1 H + 1, x2 W, y2 H)``, 1-based inclusive pixels, the
    inverse of the loader's mapping of VOC XML boxes."""
    scale = boxes.new_tensor([width, height, width, height])
    return boxes * scale + boxes.new_tensor([1.0, 1.0, 0.0, 0.0])


def detections_to_dicts(
    detections: torch.Tensor, width: int, height: int, class_names: Sequence[str]
) -> list[dict]:
    """``[K, 6]`` (x1, y1, x2, y2, score, class), normalised -> JSON-ready dicts, in order;
    ``box_px`` in the VOC pixel frame (see the module docstring)."""
    detections = detections.detach().double().cpu()
    pixels = boxes_to_voc_pixels(detections[:, :4], width, height)
    result = []
    for det, box_px in zip(detections.tolist(), pixels.tolist(), strict=True):
        class_id = int(det[5])
        box_px, box = [round(v, 2) for v in box_px], [round(v, 6) for v in det[:4]]
        entry = {"class": class_names[class_id], "class_id": class_id, "score": round(det[4], 5)}
        result.append({**entry, "box_px": box_px, "box": box})
    return result


@dataclass(frozen=True)
class Detector:
    """A model in eval mode with what inference needs; call it on a list of PIL images."""

    model: nn.Module
    anchors: torch.Tensor
    class_names: tuple[str, ...]
    img_size: int
    conf_threshold: float
    nms_threshold: float
    device: torch.device
    amp_dtype: torch.dtype | None = None
    letterbox: bool = False

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One ``[K, 6]`` detection tensor (on the CPU) per image, boxes normalised xyxy of that
        image, clipped to it."""
        batch = preprocess(images, self.img_size, letterbox=self.letterbox).to(self.device)
        dtype, enabled = self.amp_dtype or torch.float32, self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
            raw = self.model(batch).float()  # [N, A*(5+C), S, S]
        anchors = self.anchors.to(self.device)
        thresholds = {"conf_threshold": self.conf_threshold, "nms_threshold": self.nms_threshold}
        detections = [dets.cpu() for dets in postprocess(raw, anchors, **thresholds)]
        if not self.letterbox:
            return detections
        pairs = zip(detections, images, strict=True)
        return [self._unletterbox(dets, image.size) for dets, image in pairs]

    def _unletterbox(self, detections: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Boxes of the letterboxed input -> of the ``size`` (width, height) image, clipped."""
        out = detections.clone()
        out[:, :4] = unletterbox_boxes(detections[:, :4], *size, self.img_size).clamp_(0.0, 1.0)
        return out

    def describe(self, detections: torch.Tensor, width: int, height: int) -> list[dict]:
        """The JSON entries of one image's detections (see ``detections_to_dicts``)."""
        return detections_to_dicts(detections, width, height, self.class_names)

    def draw(self, image: Image.Image, detections: torch.Tensor) -> Image.Image:
        return draw_detections(
            image, detections, self.class_names, score_threshold=self.conf_threshold
        )


def output_paths(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Annotated-image names: the input's stem in ``out_dir``, PNG for PNG inputs, else JPEG.

    Repeated stems get ``_1``, ``_2``...; writing over an input is refused.
    """
    taken: set[str] = set()
    result = []
    for path in paths:
        suffix = ".png" if path.suffix.lower() == ".png" else ".jpg"
        name, count = path.stem + suffix, 0
        while name in taken:
            count += 1
            name = f"{path.stem}_{count}{suffix}"
        taken.add(name)
        target = out_dir / name
        if target.exists() and target.resolve() == path.resolve():
            raise ValueError(f"--out {out_dir} would overwrite the input {path}: choose another")
        result.append(target)
    return result


def detect_images(
    detector: Detector,
    paths: Sequence[Path],
    *,
    batch_size: int = 8,
    out_dir: Path | None = None,
    show: bool = False,
) -> list[dict]:
    """Detect in image files, a few at a time; one result dict per path, in order.

    A file that cannot be read gives ``{"image", "error"}``, is logged, and the run goes on.
    With ``out_dir``, each image is drawn with its detections and saved there.
    """
    targets = output_paths(paths, out_dir) if out_dir is not None else [None] * len(paths)
    viewer = Viewer(show, wait_ms=0)
    results: list[dict] = []
    progress = tqdm(total=len(paths), desc="detect", unit="image", disable=len(paths) < 2)
    for start in range(0, len(paths), batch_size):
        chunk = slice(start, start + batch_size)
        read = [_read_image(path) for path in paths[chunk]]
        images = [image for image, _ in read if image is not None]
        dets = iter(detector(images) if images else ())
        for path, target, (image, error) in zip(paths[chunk], targets[chunk], read, strict=True):
            if image is None:
                results.append({"image": str(path), "error": error})
            else:
                results.append(_finish_image(detector, path, target, image, next(dets), viewer))
        progress.update(len(read))
        if viewer.stop_requested:
            break
    progress.close()
    viewer.close()
    return results


def _read_image(path: Path) -> tuple[Image.Image | None, str | None]:
    try:
        return load_image(path), None
    except READ_ERRORS as error:
        log.warning("skipped %s: cannot read it as an image (%s)", path, error)
        return None, str(error)


def _finish_image(
    detector: Detector, path: Path, target: Path | None, image, dets: torch.Tensor, viewer
) -> dict:
    """The JSON entry of one image; draws, saves and shows it as asked."""
    width, height = image.size
    found = detector.describe(dets, width, height)
    log.debug("%s: %d detections", path, len(found))
    if target is not None or viewer.enabled:
        drawn = detector.draw(image, dets)
        if target is not None:
            drawn.save(target, **({"quality": 95} if target.suffix == ".jpg" else {}))
        viewer.show(drawn)
    return {"image": str(path), "width": width, "height": height, "detections": found}


def build_detector(config: DetectConfig) -> Detector:
    """Load the weights (checkpoint or darknet) onto the configured device."""
    device = select_device(config.device)
    model, class_names, anchors, _ = load_trained_model(
        config.weights,
        model_name=config.model,
        classes_file=config.classes,
        anchors_file=config.anchors,
    )
    log.info(
        "%s: %d classes, %d anchors, on %s", config.weights, len(class_names), len(anchors), device
    )
    return Detector(
        model.to(device),
        anchors.to(device),
        tuple(class_names),
        img_size=config.img_size,
        conf_threshold=config.conf_threshold,
        nms_threshold=config.nms_threshold,
        device=device,
        amp_dtype=select_amp_dtype(device, config.amp),
        letterbox=config.letterbox,
    )


def write_json(document: dict, path: Path) -> None:
    """Write ``document`` atomically (temp file in the same folder, then ``os.replace``)."""
    with atomic_open(path, "w") as handle:
        json.dump(document, handle)  # compact: a long video holds many thousand frames


def run_detect(config: DetectConfig) -> dict:
    """Detect on ``config.source``; write annotated outputs and ``detections.json`` to ``out``.

    Returns the JSON document. Unreadable images are skipped and counted; Ctrl-C on a video or
    webcam stops it cleanly with everything so far written.
    """
    if not config.weights:
        raise ValueError(
            "--weights is required: a checkpoint of this project (model/<run>/best.pt) or "
            "darknet's yolov2-voc.weights"
        )
    if not config.source:
        raise ValueError(
            "--source is required: image files, folders, a video file or a webcam index"
        )
    source = resolve_source(config.source)
    detector = build_detector(config)
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    interrupted = False
    if source.kind == "images":
        results = detect_images(
            detector, source.paths, batch_size=config.batch_size, out_dir=out_dir, show=config.show
        )
    else:
        results, interrupted = detect_stream(
            detector,
            source,
            out_path=video_output_path(source, out_dir),
            batch_size=config.batch_size,
            max_frames=config.max_frames,
            show=config.show,
        )
    skipped = sum("error" in result for result in results)
    settings = {name: getattr(config, name) for name in DOCUMENTED_SETTINGS}
    document = {**settings, "source": list(config.source), "classes": list(detector.class_names)}
    document.update(skipped=skipped, interrupted=interrupted, results=results)
    write_json(document, out_dir / JSON_NAME)
    found = sum(len(result.get("detections", ())) for result in results)
    unit = "images" if source.kind == "images" else "frames"
    done = f"{unit}: {len(results) - skipped}, detections: {found}, skipped: {skipped}"
    log.info("%s; results in %s", done, out_dir)
    return document
