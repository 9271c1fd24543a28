"""Release files: what inference needs and nothing else (no optimizer state, no RNG).

Two forms of the same content, both loadable wherever a checkpoint is (test, detect, export,
``load_detector``, ``--weights``):

- ``.pt``: the checkpoint dict with ``"release": True`` and without what only a resume reads
  (optimizer, AMP scaler, RNG states); ``best.pt`` of a run is written in this form, while
  ``last.pt`` keeps everything a resume needs.
- ``.safetensors``: the model's tensors in safetensors, and the rest as JSON strings in the
  same file's header metadata (``"yolov2"`` holds it), so no pickle is ever involved.

Either is about the size of the weights themselves (float32: 4 bytes a parameter).
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.fileio import atomic_path

METADATA_KEY = "yolov2"
TRAINING_ONLY = ("optimizer", "scaler", "scheduler", "rng")  # what only a resume reads


def release_checkpoint(checkpoint: dict) -> dict:
    """A training checkpoint -> its release form: the same dict without the optimizer, scaler
    and RNG states (``state`` with the counters and best mAP stays: a few numbers)."""
    release = {key: value for key, value in checkpoint.items() if key not in TRAINING_ONLY}
    release["release"] = True
    return release


def save_safetensors(checkpoint: dict, path: str | Path) -> Path:
    """Write a checkpoint's (full or release) inference content as ``.safetensors``,
    atomically."""
    from safetensors.torch import save_file

    release = release_checkpoint(checkpoint)
    tensors = {k: v.detach().cpu().contiguous() for k, v in release["model"].items()}
    meta = {k: v for k, v in release.items() if k != "model"}
    path = Path(path)
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def load_safetensors(path: str | Path) -> dict:
    """A ``.safetensors`` release -> the checkpoint dict :func:`save_safetensors` wrote."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: not a safetensors file ({error})") from None
    if meta is None:
        raise ValueError(
            f"{path} is a safetensors file without this project's metadata (classes, anchors, "
            "config): export one with export.py --format safetensors"
        )
    return {**json.loads(meta), "model": tensors}
