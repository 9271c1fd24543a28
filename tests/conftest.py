"""Shared fixtures: one torch thread, the small demo dataset, a writer of custom VOC folders,
the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.demo import generate_demo_dataset


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    """Tests marked ``gpu`` are skipped where CUDA is absent."""
    if request.node.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run on one torch CPU thread, and so do the Python processes they start.

    Their numbers then do not depend on the machine's core count, and on a busy machine one
    thread is several times faster than two contending for the cores. What must not depend on
    the thread count is tested on two threads explicitly (``two_torch_threads``).
    """
    previous, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(previous)
    if variable is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture
def two_torch_threads():
    """The test runs on two torch CPU threads whatever the machine has (one core included): what
    differs between one thread and more shows on any machine. One thread again after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo dataset (24 train, 8 val images) in the VOCdevkit layout; read-only."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=24, num_val=8, seed=0)


class VocWriter:
    """Writes a custom VOC-format folder ``<root>/VOC<name>/`` file by file, for bad-input tests.

    ``objects`` are ``(name, (xmin, ymin, xmax, ymax), difficult)`` with VOC's 1-based corners;
    ``difficult=None`` leaves the tag out. ``size=None`` leaves ``<size>`` out.
    """

    def __init__(self, root: Path, name: str = "test"):
        self.root, self.name = root, name
        self.folder = root / f"VOC{name}"
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.ids: list[str] = []

    def image(self, image_id: str, size=(64, 48), mode: str = "RGB", fmt: str = "JPEG") -> Path:
        """A random image of ``size`` (width, height) in ``mode``, saved as ``<id>.jpg``."""
        rng = np.random.default_rng(len(self.ids))
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if mode == "P":
            image = image.quantize(16)
        elif mode == "I;16":
            image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
        else:
            image = image.convert(mode)
        path = self.folder / "JPEGImages" / f"{image_id}.jpg"
        image.save(path, format=fmt)
        return path

    def raw_image(self, image_id: str, data: bytes) -> Path:
        path = self.folder / "JPEGImages" / f"{image_id}.jpg"
        path.write_bytes(data)
        return path

    def annotation(self, image_id: str, objects=(), size=(64, 48)) -> Path:
        parts = ["<annotation>", f"<filename>{image_id}.jpg</filename>"]
        if size is not None:
            parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
        for name, corners, difficult in objects:
            tags = "".join(
                f"<{key}>{value}</{key}>"
                for key, value in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True)
            )
            flag = "" if difficult is None else f"<difficult>{int(difficult)}</difficult>"
            parts.append(f"<object><name>{name}</name>{flag}<bndbox>{tags}</bndbox></object>")
        parts.append("</annotation>")
        return self.raw_annotation(image_id, "\n".join(parts))

    def raw_annotation(self, image_id: str, text: str) -> Path:
        path = self.folder / "Annotations" / f"{image_id}.xml"
        path.write_text(text, encoding="utf-8")
        if image_id not in self.ids:
            self.ids.append(image_id)
        return path

    def add(self, image_id: str, objects=(), size=(64, 48), xml_size="same", **image_kwargs):
        """An image and its annotation; ``xml_size=None`` leaves ``<size>`` out."""
        self.image(image_id, size=size, **image_kwargs)
        self.annotation(image_id, objects, size=size if xml_size == "same" else xml_size)

    def write_set(self, split: str = "trainval", ids=None) -> list[tuple[str, str]]:
        """Write ``ImageSets/Main/<split>.txt`` (all ids so far by default); returns the sets."""
        lines = "".join(f"{image_id}\n" for image_id in (self.ids if ids is None else ids))
        (self.folder / "ImageSets" / "Main" / f"{split}.txt").write_text(lines)
        return [(self.name, split)]


@pytest.fixture
def voc_writer(tmp_path) -> VocWriter:
    return VocWriter(tmp_path)
