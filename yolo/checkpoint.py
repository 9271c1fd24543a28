"""Checkpoints: one plain dict, written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from utils.fileio import atomic_open
from yolo.config import config_to_dict

log = logging.getLogger(__name__)


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A crash while writing leaves the previous file intact.
    """
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint of this project, refusing anything that is not plain data.

    ``torch.load(weights_only=True)`` never runs code from the file; a file that needs arbitrary
    unpickling (a checkpoint from another project, or a malicious one) is refused with an error
    that says why.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: train one (model/<run>/best.pt) or pass its path"
        )
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint file (truncated, or "
            f"another format; {path.stat().st_size} bytes)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path}: it holds Python objects that could run code when "
            f"unpickled, so it is not a checkpoint of this project (weights_only=True: {error})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"cannot read checkpoint {path}: {error} (truncated or not a .pt?)"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(
            f"{path} is not a checkpoint of this project: expected a dict with 'model' and "
            f"'config' keys, found {type(state).__name__}"
            + (f" with keys {sorted(state)[:8]}" if isinstance(state, dict) else "")
        )
    return state


def capture_rng_state() -> dict:
    """RNG states as plain tensors (loadable with weights_only=True)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Strict load with an error that says which shapes differ and from which file."""
    own = model.state_dict()
    mismatched = [
        f"{k}: {tuple(v.shape)} in {source} vs {tuple(own[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(
            f"{source} does not fit this model (another class count, anchor count or "
            "backbone?): " + "; ".join(mismatched[:4])
        )
    model.load_state_dict(state_dict)


def check_resumable(ckpt: dict, config, classes, anchors: torch.Tensor, path) -> None:
    """Resuming is only meaningful for the same model, classes and anchors."""
    saved = ckpt["config"]
    problems = []
    if saved["model"] != config.model:
        problems.append(f"model {saved['model']} vs --model {config.model}")
    if saved.get("optimizer", "sgd") != config.optimizer:
        problems.append(
            f"optimizer {saved.get('optimizer', 'sgd')} vs --optimizer {config.optimizer}"
        )
    if list(ckpt["classes"]) != list(classes):
        problems.append(f"classes {list(ckpt['classes'])[:5]}... vs {list(classes)[:5]}...")
    if not torch.allclose(torch.tensor(ckpt["anchors"]), anchors.cpu()):
        problems.append(f"anchors {ckpt['anchors']} vs {anchors.tolist()}")
    if problems:
        raise ValueError(
            f"cannot resume from {path}: it was trained with another "
            + "; ".join(problems)
            + ". Use --weights to start a new run from it, or a new --run name."
        )


def training_checkpoint(model, optimizer, scaler, state, config, classes, anchors) -> dict:
    """The one checkpoint dict: weights, optimizer, AMP scaler, counters, config, RNG."""
    return {
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": {"iteration": state.iteration, "epoch": state.epoch},
        "state": dataclasses.asdict(state),
        "finished": state.epoch >= config.epochs,
        "config": config_to_dict(config),
        "classes": list(classes),
        "anchors": anchors.tolist(),
        "rng": capture_rng_state(),
    }


def restore_training(ckpt: dict, model, optimizer, scaler) -> dict:
    """Load weights, optimizer, scaler and RNG from ``ckpt``; returns the saved counters."""
    load_model_weights(model, ckpt["model"], "checkpoint")
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng_state(ckpt["rng"])
    return dict(ckpt["state"])
