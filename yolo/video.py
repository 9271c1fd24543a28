"""Video files, webcams and the ``--show`` window for ``detect.py``: OpenCV capture and
writing, and :func:`detect_stream`, which runs a detector (:class:`yolo.detect.Detector`) on the
frames.

OpenCV is imported only when one of these is used.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from yolo.source import Source

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
QUIT_KEYS = (ord("q"), 27)  # q, Esc


class Detector(Protocol):
    """What the stream needs of :class:`yolo.detect.Detector` (which imports this module)."""

    def detect(self, images: list[Image.Image]) -> list: ...

    def describe(self, detections, width: int, height: int) -> list[dict]: ...

    def draw(self, image: Image.Image, detections) -> Image.Image: ...


def import_cv2():
    """OpenCV, needed only for video, webcam and ``--show``."""
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            "video files, webcams and --show need OpenCV: pip install opencv-python-headless "
            "(or opencv-python for --show windows)"
        ) from error
    return cv2


def bgr_to_pil(frame: np.ndarray) -> Image.Image:
    """OpenCV's ``[H, W, 3]`` uint8 BGR -> PIL RGB."""
    return Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))  # [H, W, 3] BGR -> RGB


def pil_to_bgr(image: Image.Image) -> np.ndarray:
    """PIL RGB -> OpenCV's ``[H, W, 3]`` uint8 BGR."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # RGB -> BGR


class Viewer:
    """An optional OpenCV window; q or Esc asks to stop. Without a display it turns itself off.

    ``wait_ms`` 0 waits for a key after each image; video uses 1.
    """

    def __init__(self, enabled: bool, *, wait_ms: int) -> None:
        # GUI builds of OpenCV can abort the process when no display is reachable, so check first.
        headless = sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        )
        if enabled and headless:
            log.warning("--show: no display (DISPLAY is not set); writing files only")
            enabled = False
        self.cv2 = import_cv2() if enabled else None
        self.enabled = enabled
        self.wait_ms = wait_ms
        self.stop_requested = False

    def show(self, image: Image.Image) -> None:
        if not self.enabled:
            return
        try:
            self.cv2.imshow("detect", pil_to_bgr(image))
            key = self.cv2.waitKey(self.wait_ms)
        except self.cv2.error as error:
            log.warning("--show: cannot open a window (%s); going on without one", error)
            self.enabled = False
            return
        if key & 0xFF in QUIT_KEYS:
            log.info("stop key pressed")
            self.stop_requested = True

    def close(self) -> None:
        if self.enabled:
            self.cv2.destroyAllWindows()


class VideoSink:
    """An mp4 (``mp4v``) at ``fps``, opened at the first frame's size."""

    def __init__(self, cv2, path: Path, fps: float) -> None:
        self.cv2, self.path, self.fps = cv2, path, fps
        self.writer = None

    def write(self, image: Image.Image) -> None:
        if self.writer is None:
            fourcc = self.cv2.VideoWriter_fourcc(*"mp4v")
            self.writer = self.cv2.VideoWriter(str(self.path), fourcc, self.fps, image.size)
            if not self.writer.isOpened():
                raise ValueError(
                    f"cannot write {self.path}: this OpenCV build has no mp4v encoder; "
                    "reinstall opencv-python-headless"
                )
        self.writer.write(pil_to_bgr(image))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def open_capture(cv2, source: Source):
    """A ``cv2.VideoCapture`` on the webcam index or video file of ``source``, checked open."""
    target = source.webcam if source.kind == "webcam" else str(source.paths[0])
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        capture.release()
        if source.kind == "webcam":
            raise ValueError(
                f"--source {target}: cannot open webcam {target}; is it connected and free? "
                "Try another index (0, 1, ...)"
            )
        raise ValueError(f"--source {target}: OpenCV cannot open this video (codec or file?)")
    return capture


def capture_fps(cv2, capture) -> float:
    """The source's frame rate; webcams often report 0, which means ``DEFAULT_FPS``."""
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    return fps if math.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS


def read_frames(capture, chunk: int, max_frames: int | None) -> Iterator[list[np.ndarray]]:
    """Lists of up to ``chunk`` BGR frames until the stream ends or ``max_frames`` are read."""
    count = 0
    while max_frames is None or count < max_frames:
        size = chunk if max_frames is None else min(chunk, max_frames - count)
        frames = []
        for _ in range(size):
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        if frames:
            yield frames
        count += len(frames)
        if len(frames) < size:
            return


def detect_stream(
    detector: Detector,
    source: Source,
    *,
    out_path: Path,
    batch_size: int = 8,
    max_frames: int | None = None,
    show: bool = False,
) -> tuple[list[dict], bool]:
    """Detect in a video file or webcam, writing an annotated mp4 at the source's fps and size.

    Stops at the end of the stream, after ``max_frames``, on q/Esc in the ``show`` window, or
    on Ctrl-C; the capture and the writer are released in every case. Returns one result per
    frame and whether Ctrl-C stopped it.
    """
    cv2 = import_cv2()
    capture = open_capture(cv2, source)
    fps = capture_fps(cv2, capture)
    chunk = 1 if source.kind == "webcam" else batch_size
    sink, viewer = VideoSink(cv2, out_path, fps), Viewer(show, wait_ms=1)
    results: list[dict] = []
    interrupted = False
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if source.kind == "video" else 0
    progress = tqdm(total=min(total, max_frames or total) or None, desc="detect", unit="frame")
    try:
        for frames in read_frames(capture, chunk, max_frames):
            _detect_frames(detector, frames, fps, results, sink, viewer)
            progress.update(len(frames))
            if viewer.stop_requested:
                break
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: stopping after %d frames", len(results))
    finally:
        progress.close()
        capture.release()
        sink.close()
        viewer.close()
    return results, interrupted


def _detect_frames(
    detector: Detector, frames: list, fps: float, results: list, sink: VideoSink, viewer: Viewer
) -> None:
    images = [bgr_to_pil(frame) for frame in frames]
    for image, dets in zip(images, detector.detect(images), strict=True):
        index, (width, height) = len(results), image.size
        found = detector.describe(dets, width, height)
        frame = {"frame": index, "time_s": round(index / fps, 4), "width": width, "height": height}
        results.append({**frame, "detections": found})
        drawn = detector.draw(image, dets)
        sink.write(drawn)
        viewer.show(drawn)


def video_output_path(source: Source, out_dir: Path) -> Path:
    if source.kind == "webcam":
        return out_dir / f"webcam{source.webcam}.mp4"
    path = out_dir / f"{source.paths[0].stem}.mp4"
    if path.exists() and path.resolve() == source.paths[0].resolve():
        raise ValueError(f"--out {out_dir} would overwrite the input {path}: choose another")
    return path
