"""Builders shared by the train, test and detect scripts: data, model, optimizer, schedule."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from utils.anchors import default_anchors, load_anchors
from utils.data import VOC_CLASSES, VOCDataset
from utils.demo import generate_demo_dataset
from utils.loader import build_dataloader
from utils.transforms import build_eval_transform, build_train_transform
from utils.voc import load_classes, parse_sets
from yolo.checkpoint import load_checkpoint, load_model_weights
from yolo.config import DEMO_ROOT
from yolo.loss import YOLOv2Loss
from yolo.model import build_model
from yolo.runtime import Runtime

log = logging.getLogger(__name__)

DEMO_CLASSES_FILE = "demo_classes.txt"


def resolve_demo(config):
    """With ``--demo``: generate the demo dataset if missing and point the config at it."""
    if not config.demo:
        return config
    root = generate_demo_dataset(DEMO_ROOT)
    changes = {"data_root": str(root), "classes": str(Path(root) / DEMO_CLASSES_FILE)}
    names = {item.name for item in dataclasses.fields(config)}
    if "train_sets" in names:
        changes["train_sets"] = ("demo:train",)
    changes["val_set"] = "demo:val"
    return dataclasses.replace(config, **changes)


def resolve_classes(classes_file: str | None) -> tuple[str, ...]:
    return load_classes(classes_file) if classes_file else VOC_CLASSES


def resolve_anchors(anchors_file: str | None) -> torch.Tensor:
    """``[A, 2]`` anchors as fractions of the image: the file's, else darknet's VOC set."""
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


def learning_rate(
    base_lr: float,
    *,
    iteration: int,
    epoch: int,
    burn_in: int,
    lr_steps: tuple[int, ...],
    gamma: float,
) -> float:
    """Darknet's burn-in ``lr * (i / burn_in) ** 4`` for the first optimizer steps, then steps.

    ``iteration`` counts optimizer steps (darknet's batches of 64 images); ``lr_steps`` are
    epochs, as the paper states its schedule (/10 at epochs 60 and 90).
    """
    factor = gamma ** sum(epoch >= step for step in lr_steps)
    if iteration < burn_in:
        factor *= (iteration / burn_in) ** 4
    return base_lr * factor


def lr_schedule(config):
    """``lr_at(iteration, epoch)``: the learning rate of the config's schedule (burn-in, steps)."""

    def lr_at(iteration: int, epoch: int) -> float:
        return learning_rate(
            config.lr,
            iteration=iteration,
            epoch=epoch,
            burn_in=config.burn_in,
            lr_steps=config.lr_steps,
            gamma=config.lr_gamma,
        )

    return lr_at


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


def build_train_model(config, num_classes: int, num_anchors: int) -> nn.Module:
    """The model a training run starts from: darknet weights, ImageNet weights or scratch."""
    pretrained: bool | str = False
    if config.darknet_weights:
        pretrained = config.darknet_weights
    elif config.pretrained == "default":
        pretrained = True
    elif config.pretrained:
        pretrained = config.pretrained
    return build_model(
        config.model, num_classes=num_classes, num_anchors=num_anchors, pretrained=pretrained
    )


def load_trained_model(
    weights: str, *, model_name: str, classes_file: str | None, anchors_file: str | None
) -> tuple[nn.Module, tuple[str, ...], torch.Tensor]:
    """A model ready for inference from a project checkpoint (.pt) or darknet .weights.

    Returns ``(model, classes, anchors)``. darknet .weights take ``classes_file`` and
    ``anchors_file`` (default VOC's classes and darknet's anchors); a checkpoint supplies its
    own, and a warning says so where the files given differ from it.
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {path} not found. Train a model (it lands in model/<run>/best.pt), put "
            "released weights into ./model, or pass darknet's yolov2-voc.weights "
            "(https://pjreddie.com/media/files/yolov2-voc.weights) with --weights."
        )
    if path.suffix == ".weights":
        classes = resolve_classes(classes_file)
        anchors = resolve_anchors(anchors_file)
        model = build_model(
            model_name, num_classes=len(classes), num_anchors=len(anchors), pretrained=str(path)
        )
        return model.eval(), classes, anchors
    state = load_checkpoint(path)
    saved = state["config"]
    classes = tuple(state["classes"])
    anchors = torch.tensor(state["anchors"], dtype=torch.float32)
    if classes_file and resolve_classes(classes_file) != classes:
        log.warning("--classes %s ignored: checkpoint %s holds its own", classes_file, path)
    if anchors_file and not torch.equal(resolve_anchors(anchors_file), anchors):
        log.warning("--anchors %s ignored: checkpoint %s holds its own", anchors_file, path)
    model = build_model(saved["model"], num_classes=len(classes), num_anchors=len(anchors))
    load_model_weights(model, state["model"], str(path))
    return model.eval(), classes, anchors


def build_loaders(config, classes: tuple[str, ...], runtime: Runtime):
    """Training loader (darknet augmentation, seeded, sharded) and validation loader."""
    train_set = VOCDataset(
        config.data_root,
        parse_sets(list(config.train_sets)),
        classes,
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
    val_set = VOCDataset(
        config.data_root,
        parse_sets([config.val_set]),
        classes,
        keep_difficult=True,
        strict=config.strict,
        transform=build_eval_transform(config.eval_img_size),
    )
    for name, dataset in (("train", train_set), ("val", val_set)):
        if runtime.is_main:
            log.info("%s set: %s", name, dataset.summary())
    common = {
        "workers": config.workers,
        "seed": config.seed,
        "num_replicas": runtime.world_size,
        "rank": runtime.rank,
    }
    train_loader = build_dataloader(train_set, batch_size=config.batch_size, shuffle=True, **common)
    val_loader = build_dataloader(val_set, batch_size=config.batch_size, shuffle=False, **common)
    return train_loader, val_loader
