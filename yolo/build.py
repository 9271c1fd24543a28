"""Builders shared by the train, test and detect scripts: data, model, optimizer, schedule."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from utils.anchors import default_anchors, load_anchors
from utils.data import VOC_CLASSES
from utils.demo import DEMO_CLASSES_FILE, generate_demo_dataset
from utils.formats import check_trainable, dataset_classes, open_dataset
from utils.loader import build_dataloader
from utils.transforms import build_eval_transform, build_train_transform
from utils.voc import load_classes, parse_sets
from yolo.checkpoint import load_checkpoint, load_model_weights
from yolo.config import DEMO_ROOT
from yolo.darknet import (
    darknet_conv_layers,
    darknet_weights_nbytes,
    load_darknet_weights,
    prediction_filters_in_file,
    read_header,
)
from yolo.loss import YOLOv2Loss
from yolo.model import build_model
from yolo.runtime import Runtime
from yolo.weights import DARKNET_RELEASES, ResolvedWeights, resolve_weights

log = logging.getLogger(__name__)

DARKNET_IMG_SIZE = 416  # what yolov2-voc.cfg evaluates at
PREDICTION_KEYS = ("head.conv.weight", "head.conv.bias")  # the layer sized by classes, anchors


def resolve_demo(config, runtime: Runtime | None = None):
    """With ``--demo``: generate the demo dataset if missing and point the config at it. Under
    torchrun, rank 0 generates it while the other ranks wait."""
    if not config.demo:
        return config
    together = runtime is not None and runtime.distributed
    if together and not runtime.is_main:
        dist.barrier()
    root = generate_demo_dataset(DEMO_ROOT)
    if together and runtime.is_main:
        dist.barrier()
    changes = {"data_root": str(root), "classes": str(Path(root) / DEMO_CLASSES_FILE)}
    names = {item.name for item in dataclasses.fields(config)}
    if "data" in names:
        changes["data"] = None  # --demo wins over --data
    if "train_sets" in names:
        changes["train_sets"] = ("demo:train",)
    changes["val_set"] = "demo:val"
    return dataclasses.replace(config, **changes)


def resolve_classes(classes_file: str | None) -> tuple[str, ...]:
    return load_classes(classes_file) if classes_file else VOC_CLASSES


def resolve_run_classes(config) -> tuple[str, ...]:
    """A run's classes: ``--classes``, else those of a COCO/YOLO ``--data``, else VOC's 20."""
    if config.classes or not config.data:
        return resolve_classes(config.classes)
    return dataset_classes(config.data, config.data_format) or VOC_CLASSES


def data_source(config) -> tuple[str, str | None]:
    """``(path, format)`` of the dataset: ``--data`` (format from the path unless
    ``--data-format``), else the VOCdevkit ``--data-root``."""
    if getattr(config, "data", None):
        return config.data, config.data_format
    if getattr(config, "data_format", None) not in (None, "voc"):
        raise ValueError(f"--data-format {config.data_format} needs --data PATH (the dataset)")
    return config.data_root, "voc"


def resolve_anchors(anchors_file: str | None) -> torch.Tensor:
    """``[A, 2]`` anchors in grid cells: the file's, else darknet's VOC set."""
    return load_anchors(anchors_file) if anchors_file else default_anchors()


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    name: str = "sgd",
) -> torch.optim.Optimizer:
    """SGD (darknet's) or AdamW, with darknet's decay: on conv/linear weights only, never on
    biases or BatchNorm. ``momentum`` is SGD's momentum or AdamW's beta1."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    if name != "sgd":
        raise ValueError(f"optimizer {name!r}: choose sgd or adamw")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def build_training(config, num_classes: int, anchors: torch.Tensor, runtime: Runtime):
    """Model (on the device; channels_last on CUDA), loss, optimizer and AMP scaler of a run."""
    device = runtime.device
    model = build_train_model(config, num_classes, len(anchors)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = YOLOv2Loss(anchors, num_classes, assignment=config.assignment).to(device)
    optimizer = build_optimizer(
        model,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        name=config.optimizer,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype is torch.float16)
    return model, criterion, optimizer, scaler


def initial_weights(model: nn.Module, weights: str) -> None:
    """``--weights`` of a new run: start from a checkpoint of this project or darknet's weights
    (a file or a release name). Weights for another class or anchor count fill every layer but
    the prediction conv, which keeps its initialisation (fine-tuning to a new dataset)."""
    found = find_weights(weights)
    if found.model is not None and found.model != model.backbone_name:
        raise ValueError(f"--weights {weights} is a {found.model} model: use --model {found.model}")
    if found.path.suffix == ".weights" or found.model is not None:
        full = darknet_weights_nbytes(model, header_bytes=read_header(found.path)[4])
        fits = found.path.stat().st_size == full
        if not fits and prediction_filters_in_file(model, found.path) is None:
            raise ValueError(
                f"--weights {weights} holds neither this {model.backbone_name} model nor one of "
                "another class count (a backbone such as darknet19_448.conv.23 goes to "
                "--darknet-weights)"
            )
        layers = len(darknet_conv_layers(model))
        load_darknet_weights(model, found.path, max_layers=None if fits else layers - 1)
    else:
        state = load_checkpoint(found.path)["model"]
        own = model.state_dict()
        fits = all(state[k].shape == own[k].shape for k in PREDICTION_KEYS if k in state)
        if not fits:
            state = {**state, **{k: own[k] for k in PREDICTION_KEYS}}
        load_model_weights(model, state, str(found.path))
    if not fits:
        log.warning(
            "%s predicts another number of classes or anchors: every layer but the prediction "
            "conv starts from it; the prediction conv starts from scratch",
            weights,
        )


def build_train_model(config, num_classes: int, num_anchors: int) -> nn.Module:
    """The model a training run starts from: darknet weights, ImageNet weights or scratch."""
    pretrained: bool | str = False
    if config.darknet_weights:
        pretrained = str(find_weights(config.darknet_weights).path)
    elif config.pretrained == "default":
        pretrained = True
    elif config.pretrained:
        pretrained = config.pretrained
    return build_model(
        config.model, num_classes=num_classes, num_anchors=num_anchors, pretrained=pretrained
    )


class TrainedModel(NamedTuple):
    """A model ready for inference and what it needs: its class names, its anchors ``[A, 2]``
    (grid cells) and the input size it was evaluated at in training."""

    model: nn.Module
    classes: tuple[str, ...]
    anchors: torch.Tensor
    img_size: int


def find_weights(weights: str) -> ResolvedWeights:
    """``--weights``: a file, or the name of darknet's published weights (downloaded once)."""
    try:
        return resolve_weights(weights)
    except FileNotFoundError as error:
        if Path(weights).suffix or "/" in weights:  # a path, not a mistyped name
            raise FileNotFoundError(
                f"weights {weights} not found: a run's own weights are model/<run>/best.pt; "
                f"darknet's can be named: {', '.join(DARKNET_RELEASES)}"
            ) from None
        raise FileNotFoundError(f"{error}; a run's own weights are model/<run>/best.pt") from None


def load_trained_model(
    weights: str, *, model_name: str, classes_file: str | None, anchors_file: str | None
) -> TrainedModel:
    """A model in eval mode from a project checkpoint (.pt), a darknet .weights file or the
    name of darknet's published weights (e.g. ``yolov2-voc``).

    A darknet file takes ``model_name``, ``classes_file`` and ``anchors_file`` (default VOC's
    classes and darknet's anchors) and is evaluated at 416; a named release and a checkpoint
    supply their own model, classes, anchors and evaluation size, and a warning says so where
    the files given differ from them.
    """
    found = find_weights(weights)
    path = found.path
    if found.classes is not None:  # a named darknet release
        _warn_ignored(classes_file, anchors_file, found.classes, found.anchors, found.name)
        model = build_model(found.model, num_classes=len(found.classes),
                            num_anchors=len(found.anchors), pretrained=str(path))  # fmt: skip
        return TrainedModel(model.eval(), found.classes, found.anchors, found.img_size)
    if path.suffix == ".weights":
        classes = resolve_classes(classes_file)
        anchors = resolve_anchors(anchors_file)
        model = build_model(
            model_name, num_classes=len(classes), num_anchors=len(anchors), pretrained=str(path)
        )
        return TrainedModel(model.eval(), classes, anchors, DARKNET_IMG_SIZE)
    state = load_checkpoint(path)
    classes = tuple(state["classes"])
    anchors = torch.tensor(state["anchors"], dtype=torch.float32)
    _warn_ignored(classes_file, anchors_file, classes, anchors, f"checkpoint {path}")
    model = build_model(state["config"]["model"], num_classes=len(classes),
                        num_anchors=len(anchors))  # fmt: skip
    load_model_weights(model, state["model"], str(path))
    img_size = state["config"].get("eval_img_size", DARKNET_IMG_SIZE)
    return TrainedModel(model.eval(), classes, anchors, img_size)


def _warn_ignored(classes_file, anchors_file, classes, anchors, source: str) -> None:
    """Say where ``--classes``/``--anchors`` name other values than the weights hold."""
    if classes_file and resolve_classes(classes_file) != classes:
        log.warning("--classes %s ignored: %s holds its own", classes_file, source)
    if anchors_file and not torch.equal(resolve_anchors(anchors_file), anchors):
        log.warning("--anchors %s ignored: %s holds its own", anchors_file, source)


def require_weights(config) -> None:
    """Test, detect and export need ``--weights``; say which kinds it takes."""
    if not config.weights:
        raise ValueError(
            "--weights is required: a checkpoint of this project (model/<run>/best.pt), "
            "darknet's .weights file, or a name such as yolov2-voc"
        )


def build_val_loader(config, classes, transform, *, workers: int, runtime: Runtime):
    """The validation set of ``config.val_set`` and its (sharded, unshuffled) loader."""
    path, data_format = data_source(config)
    dataset = open_dataset(
        path,
        "val",
        data_format=data_format,
        voc_sets=parse_sets([config.val_set]),
        classes=classes,
        keep_difficult=True,
        strict=config.strict,
        transform=transform,
        keep_unreadable=True,  # an unreadable image's objects count as misses, not vanish
    )
    if runtime.is_main:
        log.info("val set: %s", dataset.summary())
    return build_dataloader(
        dataset, batch_size=config.batch_size, shuffle=False, seed=0, workers=workers,
        num_replicas=runtime.world_size, rank=runtime.rank,
        pin_memory=runtime.device.type == "cuda",
    )  # fmt: skip


def build_loaders(config, classes: tuple[str, ...], runtime: Runtime):
    """Training loader (darknet augmentation, seeded, sharded) and validation loader."""
    path, data_format = data_source(config)
    train_set = open_dataset(
        path,
        "train",
        data_format=data_format,
        voc_sets=parse_sets(list(config.train_sets)),
        classes=classes,
        keep_difficult=config.keep_difficult,
        strict=config.strict,
        transform=build_train_transform(
            config.img_size,
            jitter=config.jitter,
            hue=config.hue,
            saturation=config.saturation,
            exposure=config.exposure,
            flip_p=config.flip,
        ),
    )
    if runtime.is_main:
        log.info("train set: %s", train_set.summary())
    check_trainable(train_set, config.classes)  # before the first epoch, not after a run
    train_loader = build_dataloader(
        train_set, batch_size=config.batch_size, shuffle=True, workers=config.workers,
        seed=config.seed, num_replicas=runtime.world_size, rank=runtime.rank,
        pin_memory=runtime.device.type == "cuda",
    )  # fmt: skip
    transform = build_eval_transform(config.eval_img_size)
    val_loader = build_val_loader(config, classes, transform, workers=config.workers,
                                  runtime=runtime)  # fmt: skip
    return train_loader, val_loader
