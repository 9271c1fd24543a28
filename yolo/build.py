"""Builders of a training run: data loaders, model, loss, optimizer and AMP scaler (the test
script reuses :func:`build_val_loader`). Inference loading is :mod:`yolo.load`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from utils.batch_augment import train_pipeline
from utils.data import VOC_CLASSES
from utils.formats import check_trainable, dataset_classes, open_dataset
from utils.loader import build_dataloader
from utils.transforms import build_eval_transform, build_train_transform
from utils.voc import parse_sets
from yolo.checkpoint import load_checkpoint, load_model_weights
from yolo.darknet import (
    darknet_conv_layers,
    darknet_weights_nbytes,
    load_darknet_weights,
    prediction_filters_in_file,
    read_header,
)
from yolo.load import find_weights, resolve_classes
from yolo.loss import YOLOv2Loss
from yolo.model import build_model
from yolo.runtime import Runtime

log = logging.getLogger(__name__)

PREDICTION_KEYS = ("head.conv.weight", "head.conv.bias")  # the layer sized by classes, anchors


def resolve_run_classes(config) -> tuple[str, ...]:
    """A run's classes: ``--classes``, else those the dataset defines (a COCO file's, a YOLO
    set's, a VOC set's ``classes.txt``), else VOC's 20."""
    if config.classes:
        return resolve_classes(config.classes)
    path, data_format = data_source(config)
    if not Path(path).exists():
        return VOC_CLASSES  # the dataset's own error follows
    return dataset_classes(path, data_format) or VOC_CLASSES


def data_source(config) -> tuple[str, str | None]:
    """``(path, format)`` of the dataset: ``--data`` (format from the path unless
    ``--data-format``), else the VOCdevkit ``--data-root``."""
    if getattr(config, "data", None):
        return config.data, config.data_format
    if getattr(config, "data_format", None) not in (None, "voc"):
        raise ValueError(f"--data-format {config.data_format} needs --data PATH (the dataset)")
    return config.data_root, "voc"


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
    train_transform, collate = train_pipeline(
        build_train_transform(
            config.img_size,
            jitter=config.jitter,
            hue=config.hue,
            saturation=config.saturation,
            exposure=config.exposure,
            flip_p=config.flip,
        ),
        config.augment_on,
        runtime.device,
    )
    path, data_format = data_source(config)
    train_set = open_dataset(
        path,
        "train",
        data_format=data_format,
        voc_sets=parse_sets(list(config.train_sets)),
        classes=classes,
        keep_difficult=config.keep_difficult,
        strict=config.strict,
        transform=train_transform,
    )
    if runtime.is_main:
        log.info("train set: %s", train_set.summary())
    check_trainable(train_set, config.classes)  # before the first epoch, not after a run
    train_loader = build_dataloader(
        train_set, batch_size=config.batch_size, shuffle=True, workers=config.workers,
        seed=config.seed, num_replicas=runtime.world_size, rank=runtime.rank,
        pin_memory=runtime.device.type == "cuda", collate_fn=collate,
    )  # fmt: skip
    transform = build_eval_transform(config.eval_img_size)
    val_loader = build_val_loader(config, classes, transform, workers=config.workers,
                                  runtime=runtime)  # fmt: skip
    where = getattr(train_set, "where", None)
    if runtime.is_main and where is not None and where == getattr(val_loader.dataset, "where", 0):
        log.warning("the validation set is the training set itself (%s): its mAP measures "
                    "memory, not detection; name a val file (instances_val*.json beside an "
                    "instances_train*.json)", where)  # fmt: skip
    return train_loader, val_loader
