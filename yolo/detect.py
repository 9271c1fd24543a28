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
from PIL import Image
from torch import nn
from tqdm import tqdm

from utils.fileio import atomic_open
from utils.images import load_rgb
from utils.transforms import build_eval_transform, unletterbox_detections
from utils.visualize import draw_detections
from utils.voc import boxes_to_voc_pixels
from yolo.config import DetectConfig
from yolo.load import load_trained_model, require_weights
from yolo.nms import postprocess
from yolo.predict import Results, as_batch, make_results, to_pil
from yolo.runtime import Runtime, select_amp_dtype, select_device
from yolo.source import resolve_source
from yolo.video import Viewer, detect_stream, video_output_path

log = logging.getLogger(__name__)

JSON_NAME = "detections.json"
DOCUMENTED_SETTINGS = ("weights", "img_size", "letterbox", "conf_threshold", "nms_threshold")
READ_ERRORS = (OSError, ValueError)  # UnreadableImage is a ValueError


def load_image(path: Path) -> Image.Image:
    """An RGB image, decoded now and upright per its EXIF tag, as training and evaluation read
    it; a truncated file is decoded as far as it goes, with a warning."""
    image, truncated = load_rgb(path)
    if truncated:
        log.warning("%s is truncated: detecting on the part that decodes", path)
    return image


def preprocess(
    images: Sequence[Image.Image], img_size: int, *, letterbox: bool = False
) -> torch.Tensor:
    """PIL RGB images -> ``[N, 3, img_size, img_size]`` float RGB in [0, 1], exactly as the
    evaluation transform prepares them (darknet's resize, or its letterbox)."""
    transform = build_eval_transform(img_size, letterbox=letterbox)
    return torch.stack([transform(image, {})[0] for image in images])  # N x [3, S, S]


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
    """A model in eval mode with what inference needs.

    ``detector(images)``: paths, PIL images or uint8 ``[3, H, W]`` tensors (one or a list) ->
    one :class:`yolo.predict.Results` per image, in its own pixels; ``detector.detect`` is the
    same on PIL images, returning the project's normalised ``[K, 6]`` tensors.
    """

    model: nn.Module
    anchors: torch.Tensor
    class_names: tuple[str, ...]
    img_size: int
    conf_threshold: float
    nms_threshold: float
    runtime: Runtime
    letterbox: bool = False
    batch_size: int = 8

    def __call__(self, images) -> list[Results]:
        pil_images = [to_pil(item, index) for index, item in enumerate(as_batch(images))]
        results = []
        for start in range(0, len(pil_images), self.batch_size):
            chunk = pil_images[start : start + self.batch_size]
            for image, dets in zip(chunk, self.detect(chunk), strict=True):
                results.append(make_results(dets, image, self.class_names))
        return results

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One ``[K, 6]`` detection tensor (on the CPU) per image, boxes normalised xyxy of that
        image, clipped to it."""
        batch = self.runtime.to_device(preprocess(images, self.img_size, letterbox=self.letterbox))
        with self.runtime.autocast():
            raw = self.model(batch).float()  # [N, A*(5+C), S, S]
        anchors = self.anchors.to(self.runtime.device)
        thresholds = {"conf_threshold": self.conf_threshold, "nms_threshold": self.nms_threshold}
        detections = [dets.cpu() for dets in postprocess(raw, anchors, **thresholds)]
        if not self.letterbox:
            return detections
        pairs = zip(detections, images, strict=True)
        return [unletterbox_detections(dets, *image.size, self.img_size) for dets, image in pairs]

    def describe(self, detections: torch.Tensor, width: int, height: int) -> list[dict]:
        """The JSON entries of one image's detections (see ``detections_to_dicts``)."""
        return detections_to_dicts(detections, width, height, self.class_names)

    def draw(self, image: Image.Image | Results, detections: torch.Tensor | None = None):
        """``image`` with its detections drawn: a :class:`Results` (its own image), or a PIL
        image and its ``[K, 6]`` detections."""
        if isinstance(image, Results):
            image, detections = image.image, image.detections
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
        dets = iter(detector.detect(images) if images else ())
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
    runtime = Runtime(device, amp_dtype=select_amp_dtype(device, config.amp))
    model, class_names, anchors, img_size = load_trained_model(
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
        img_size=config.img_size or img_size,
        conf_threshold=config.conf_threshold,
        nms_threshold=config.nms_threshold,
        runtime=runtime,
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
    require_weights(config)
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
    settings["img_size"] = detector.img_size  # the size used, the checkpoint's by default
    document = {**settings, "source": list(config.source), "classes": list(detector.class_names)}
    document.update(skipped=skipped, interrupted=interrupted, results=results)
    write_json(document, out_dir / JSON_NAME)
    found = sum(len(result.get("detections", ())) for result in results)
    unit = "images" if source.kind == "images" else "frames"
    done = f"{unit}: {len(results) - skipped}, detections: {found}, skipped: {skipped}"
    log.info("%s; results in %s", done, out_dir)
    return document
