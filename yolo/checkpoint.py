"""Checkpoints: one plain dict, written atomically, read with ``weights_only=True``.

``FORMAT`` 2 holds anchors in grid cells (``"anchors_unit": "grid"``) and the model's keys of
:class:`yolo.model.YOLOv2Head`. A checkpoint written before (no ``"format"`` key) held anchors
as fractions of a 416 image and the head's layers at the top: :func:`load_checkpoint` converts
it in memory (anchors x 13, keys moved) and says so; the file itself is never changed.

Every checkpoint written holds ``"checksum"``: sha256 over its tensors (see
:func:`tensor_checksum`), checked when it is read with its weights, so a flipped bit on disk or
in a copy is an error naming the file, not weights that are silently wrong. A checkpoint
without one (written before) loads as it is.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from utils.fileio import atomic_open
from yolo.config import TrainConfig
from yolo.flags import config_from_dict, config_to_dict
from yolo.model import upgrade_state_dict
from yolo.release import load_safetensors
from yolo.runtime import launch_identity, launcher_restart, unwrap

log = logging.getLogger(__name__)

FORMAT = 2
RESUME_FLAGS = ("resume", "restart_epoch")  # how this start resumes: never a saved setting
LEGACY_GRID_SIZE = 13  # format 1 anchors were fractions of a 416 image: 13 cells


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A crash while writing leaves the previous file intact. The checkpoint is serialised in
    memory first, so a full disk is an ``OSError`` that names the path and the space needed.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({**state, "checksum": tensor_checksum(state)}, buffer)
    data = buffer.getbuffer()
    previous = path.exists()
    try:
        with atomic_open(path, "wb") as handle:
            handle.write(data)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(
            error.errno,
            f"cannot write {path}: the disk is full ({len(data) / 1e6:.0f} MB needed, "
            f"{free / 1e6:.0f} MB free); free some space or use another --model-dir, then "
            + ("resume: the previous checkpoint is intact" if previous else "start again"),
        ) from None
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, weights: bool = True
) -> dict:
    """Read a checkpoint of this project, refusing anything that is not plain data.

    ``torch.load(weights_only=True)`` never runs code from the file; a file that needs arbitrary
    unpickling (a checkpoint from another project, or a malicious one) is refused with an error
    that says why. Non-finite weights (a diverged run) are refused too. ``weights=False`` maps
    the tensors from the file without reading them, for a caller that wants the rest.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: train one (model/<run>/best.pt) or pass its path"
        )
    if path.suffix == ".safetensors":  # a release's shared form: tensors and JSON, no pickle
        state = load_safetensors(path)
        check_finite_weights(state["model"], str(path))
        return _upgrade(state, path, say=weights)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint file (truncated, or "
            f"another format; {path.stat().st_size} bytes)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=not weights)
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
    if weights:
        _check_checksum(state, path)
        check_finite_weights(state["model"], str(path))
    return _upgrade(state, path, say=weights)


def tensor_checksum(state: dict) -> str:
    """``"sha256:<hex>"`` over every tensor in ``state`` (nested dicts, lists and tuples), in a
    fixed order: each tensor's place (its keys), dtype, shape and bytes."""
    digest = hashlib.sha256()
    for place, tensor in _tensors(state, ()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(repr((place, str(tensor.dtype), tuple(tensor.shape))).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return f"sha256:{digest.hexdigest()}"


def _tensors(value, place: tuple):
    """``(place, tensor)`` for every tensor in ``value``, dict keys in sorted order."""
    if torch.is_tensor(value):
        yield place, value
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            yield from _tensors(value[key], (*place, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _tensors(item, (*place, index))


def _check_checksum(state: dict, path: Path) -> None:
    saved = state.get("checksum")
    if saved is not None and saved != tensor_checksum(state):
        raise ValueError(
            f"checkpoint {path} is corrupt: its tensors no longer match the checksum written "
            "with them (a flipped bit on disk or in a copy); use another copy or best.pt/last.pt"
        )


def _upgrade(state: dict, path: Path, say: bool) -> dict:
    """A checkpoint of an earlier format, in today's format (in memory only); ``say``: warn."""
    if state.get("format", 1) >= FORMAT:
        return state
    state = dict(state)
    state["model"] = upgrade_state_dict(state["model"])
    if "anchors" in state:
        state["anchors"] = [[v * LEGACY_GRID_SIZE for v in pair] for pair in state["anchors"]]
    if "anchors" in state and say:
        log.warning(
            "%s was written before anchors were stored in grid cells: its anchors (fractions "
            "of a 416 image) are read x%d as grid cells",
            path,
            LEGACY_GRID_SIZE,
        )
    state["format"], state["anchors_unit"] = FORMAT, "grid"
    return state


def check_finite_weights(state_dict: dict, source: str) -> None:
    """Raise a ``ValueError`` naming the first tensor of ``state_dict`` holding NaN or inf."""
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
            raise ValueError(
                f"{source} holds non-finite weights (NaN or inf in {key}): it comes from a run "
                "that diverged; use an earlier checkpoint"
            )


def capture_rng_state() -> dict:
    """RNG states as plain tensors (loadable with weights_only=True)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what ``capture_rng_state`` saved, for the CUDA devices this machine has."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def load_model_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Strict load with an error that says which keys or shapes differ and from which file."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own)
    mismatched = [
        f"{k}: {tuple(v.shape)} in {source} vs {tuple(own[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    if missing or unexpected:
        mismatched.insert(0, f"{len(missing)} missing and {len(unexpected)} unexpected weights")
    if mismatched:
        raise ValueError(
            f"{source} does not fit this {getattr(model, 'backbone_name', 'model')} model "
            "(another backbone, class count or anchor count?): " + "; ".join(mismatched[:3])
        )
    model.load_state_dict(state_dict)


def class_difference(saved: list[str], given: list[str]) -> str:
    """How two class lists differ, naming the names: ``classes: 'kangaro' (position 3) vs
    'kangaroo'``, or the names only one of them has."""
    only_saved = [name for name in saved if name not in given]
    only_given = [name for name in given if name not in saved]
    if only_saved or only_given:
        return (f"classes: the checkpoint's {len(saved)} have {only_saved[:8]} where this run's "
                f"{len(given)} have {only_given[:8]}")  # fmt: skip
    moved = next(i for i, (a, b) in enumerate(zip(saved, given, strict=False)) if a != b)
    return (f"classes: the same {len(saved)} names in another order (position {moved + 1}: "
            f"{saved[moved]!r} vs {given[moved]!r})")  # fmt: skip


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
        problems.append(class_difference(list(ckpt["classes"]), list(classes)))
    saved_anchors = torch.tensor(ckpt["anchors"])
    if saved_anchors.shape != anchors.shape or not torch.allclose(saved_anchors, anchors.cpu()):
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
        "format": FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": {"iteration": state.iteration, "epoch": state.epoch},
        "state": dataclasses.asdict(state),
        "finished": state.epoch >= config.epochs and not state.eval_pending,
        "config": config_to_dict(config),
        "classes": list(classes),
        "anchors": anchors.tolist(),
        "anchors_unit": "grid",
        "rng": capture_rng_state(),
    }


def restore_training(ckpt: dict, model, optimizer, scaler, source: str) -> dict:
    """Load weights, optimizer, scaler and RNG from ``ckpt``; returns the saved counters."""
    load_model_weights(model, ckpt["model"], source)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng_state(ckpt["rng"])
    return dict(ckpt["state"])


def resolve_resume(config: TrainConfig) -> TrainConfig:
    """``config`` with ``resume`` made definite: ``--resume auto`` becomes ``last`` when the
    run's ``last.pt`` exists, else None (a new run); with no ``--resume``, a command that its
    launcher reran after a failure or preemption (see :func:`yolo.runtime.launcher_restart`)
    resumes ``last.pt`` when the checkpoint was written by this same job (its launch id)."""
    last = Path(config.model_dir) / config.run / "last.pt"
    if config.resume == "auto":
        target = "last" if last.is_file() else None
        log.info("--resume auto: %s", f"resuming {last}" if target else "nothing to resume, "
                 "starting the run")  # fmt: skip
        return dataclasses.replace(config, resume=target)
    restart = launcher_restart()
    if config.resume or restart is None or not last.is_file():
        return config
    identity = launch_identity()
    saved = load_checkpoint(last, weights=False).get("launch") or {}
    if not identity or any(saved.get(key) != value for key, value in identity.items()):
        return config  # another job's checkpoint: refused as for any new run
    log.info("%s of this job: resuming %s", restart, last)
    return dataclasses.replace(config, resume="last")


def resume_path(config: TrainConfig, *, must_exist: bool = False) -> Path:
    """The checkpoint ``--resume`` names: the run's ``last.pt``, or the PATH given; with
    ``must_exist``, a missing one is a one-line error saying what to do."""
    own = config.resume == "last"
    path = Path(config.model_dir) / config.run / "last.pt" if own else Path(config.resume)
    if must_exist and not path.is_file():
        raise FileNotFoundError(
            f"--resume: {path} does not exist: "
            + (f"run {config.run!r} saved no checkpoint yet; start it without --resume"
               if own else "give the path of a checkpoint, e.g. model/<run>/last.pt")
        )  # fmt: skip
    return path


def checkpoint_to_resume(
    config, run_dir: Path, classes, anchors, world_size: int = 1
) -> dict | None:
    """The checkpoint ``--resume`` names (checked against this run), or None for a new run."""
    if not config.resume:
        if (run_dir / "last.pt").exists():
            raise FileExistsError(
                f"run {config.run!r} already has checkpoints in {run_dir}: continue it with "
                f"--resume (or --resume auto in a job that may restart), start another with "
                f"--run NAME, or delete {run_dir} to start over"
            )
        return None
    path = resume_path(config, must_exist=True)
    ckpt = load_checkpoint(path)
    if ckpt.get("release"):
        raise ValueError(
            f"cannot resume from {path}: it holds the weights only (a release file such as "
            "best.pt); resume from the run's last.pt, or start a new run from it with --weights"
        )
    check_resumable(ckpt, config, classes, anchors, path)
    changed = changed_settings(config_from_dict(TrainConfig, ckpt["config"]), config)
    if changed:
        log.warning("resuming %s with changed settings: %s", path, changed)
    state = ckpt["state"]
    if "epoch_images" not in state:  # written before runs resumed by images, as many processes
        state["epoch_images"] = state["batch"] * ckpt["config"]["batch_size"] * world_size
    return ckpt


def check_resume_data(ckpt: dict, data: dict, config: TrainConfig) -> None:
    """Compare the data a resumed run finds (``data``: ``{"train": record, "val": record}``,
    see :func:`utils.loader.data_record`) with what its checkpoint trained on.

    Changed training images under a mid-epoch resume would continue another shuffle (images
    trained twice, others never): refused in one line, or with ``--restart-epoch`` the epoch
    starts again on the new data (``ckpt["state"]`` is changed so). At an epoch boundary, or
    for the val set, a changed set is one warning line. A checkpoint with no record passes.
    """
    saved, state = ckpt.get("data") or {}, ckpt["state"]
    epoch, path = state["epoch"] + 1, resume_path(config)
    if saved.get("val") and saved["val"] != data["val"]:
        log.warning("the val split holds %d images, the run evaluated on %d (%s): mAPs from "
                    "here on compare with the best so far on other images", data["val"]["images"],
                    saved["val"]["images"], _short(saved["val"]))  # fmt: skip
    if not saved.get("train") or saved["train"] == data["train"]:
        return
    change = (f"the train split holds {data['train']['images']} images, the run trained on "
              f"{saved['train']['images']} ({_short(saved['train'])}, now "
              f"{data['train']['digest'][:15]}…)")  # fmt: skip
    if not state["epoch_images"]:
        log.warning("%s: epoch %d trains on the new data", change, epoch)
    elif config.restart_epoch:
        log.warning("%s: epoch %d starts again on the new data (--restart-epoch); its %d "
                    "images trained before stay trained", change, epoch,
                    state["epoch_images"])  # fmt: skip
        state.update(batch=0, epoch_images=0, loss_sums={}, loss_steps=0)
    else:
        raise ValueError(
            f"cannot resume {path} mid-epoch: {change}: restore the data, or resume with "
            f"--restart-epoch to start epoch {epoch} again on the new data"
        )


def _short(record: dict) -> str:
    """A data record's digest, shortened for messages."""
    return f"digest {record['digest'][:15]}…"


def changed_settings(saved: TrainConfig, config: TrainConfig) -> str:
    """``--flag old -> new`` for every setting that differs, the resume flag aside."""
    old, new = config_to_dict(saved), config_to_dict(config)
    return ", ".join(
        f"--{name.replace('_', '-')} {old[name]} -> {new[name]}"
        for name in new
        if name not in RESUME_FLAGS and old.get(name) != new[name]
    )


def resume_settings(config: TrainConfig, given: frozenset[str]) -> TrainConfig:
    """For ``--resume`` (or a restart that resumes, see :func:`resolve_resume`): the run's own
    saved settings, with only the flags given on the command line changed (``given``), so a
    resumed run never falls back to a preset's value. How to resume is never inherited."""
    config = resolve_resume(config)
    if not config.resume or not resume_path(config).is_file():
        return config  # a missing checkpoint is reported by the run, once it holds its folder
    saved = load_checkpoint(resume_path(config), weights=False)["config"]
    saved = config_from_dict(TrainConfig, saved)
    kept = set(given) | set(RESUME_FLAGS)
    return dataclasses.replace(saved, **{name: getattr(config, name) for name in kept})
