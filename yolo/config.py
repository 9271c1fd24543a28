"""Run configuration: frozen dataclasses whose fields are the command-line flags.

Each field becomes one ``--kebab-case`` flag (booleans get ``--x/--no-x``, tuples take several
values); unknown flags are an error. Entry scripts hold a preset instance and call
:func:`parse_config`, so the three train scripts differ only in their presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from utils.download import VOC_TARBALLS, check_mirror
from utils.fileio import atomic_write_text

MODELS = ("darknet19", "tiny", "resnet18", "resnet50", "resnet101")
OPTIMIZERS = ("sgd", "adamw")
DEMO_ROOT = "data/demo"


def flag(default, help_text: str, **extra):
    """A config field that becomes the flag ``--<field-name>`` (see :func:`build_parser`)."""
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint."""

    model: str = flag("darknet19", f"backbone, one of {', '.join(MODELS)}")
    # --run-name too: torchrun's parser reads a bare --run as an abbreviation of its --run-path
    run: str = flag("yolov2", "run name: logs/<run>/ and model/<run>/", alias="--run-name")
    data_root: str = flag("data/VOCdevkit", "VOCdevkit folder holding VOC2007/, VOC2012/")
    train_sets: tuple[str, ...] = flag(("2007:trainval", "2012:trainval"), "NAME:SPLIT ...")
    val_set: str = flag("2007:test", "NAME:SPLIT evaluated every --eval-every epochs")
    classes: str | None = flag(None, "classes file, one name per line (default: VOC's 20)")
    anchors: str | None = flag(None, "anchors JSON from kmeans.py (default: darknet's VOC set)")
    demo: bool = flag(False, "generate the demo dataset if missing and train on it")
    epochs: int = flag(160, "number of epochs")
    batch_size: int = flag(16, "images per forward pass (per GPU)")
    accum: int = flag(4, "batches accumulated per optimizer step (64 = batch * accum * GPUs)")
    img_size: int = flag(416, "training size when multi-scale is off")
    eval_img_size: int = flag(416, "evaluation size")
    multi_scale: bool = flag(True, "a random size in 320..608 every --multi-scale-every batches")
    multi_scale_every: int = flag(10, "batches between multi-scale size changes")
    min_size: int = flag(320, "smallest multi-scale size")
    max_size: int = flag(608, "largest multi-scale size")
    optimizer: str = flag("sgd", "sgd (darknet's) | adamw (converges in fewer steps)")
    lr: float = flag(1e-3, "peak learning rate")
    momentum: float = flag(0.9, "SGD momentum; AdamW's beta1")
    weight_decay: float = flag(
        5e-4, "weight decay on conv/linear weights, not biases or BN (AdamW: decoupled)"
    )
    burn_in: int = flag(1000, "optimizer steps of darknet's burn-in, lr * (i / burn_in) ** 4")
    lr_steps: tuple[int, ...] = flag((60, 90), "epochs at which lr is multiplied by --lr-gamma")
    lr_gamma: float = flag(0.1, "lr factor at each of --lr-steps")
    jitter: float = flag(0.3, "darknet jitter of the random crop")
    hue: float = flag(0.1, "hue shift, fraction of the colour circle")
    saturation: float = flag(1.5, "saturation scale up to this or its inverse")
    exposure: float = flag(1.5, "exposure scale up to this or its inverse")
    flip: float = flag(0.5, "horizontal flip probability")
    keep_difficult: bool = flag(False, "train on difficult objects too (darknet leaves them out)")
    strict: bool = flag(False, "stop at an unknown class name instead of skipping the object")
    assignment: str = flag("global", "loss target assignment: global | darknet")
    conf_threshold: float = flag(0.005, "evaluation score threshold")
    nms_threshold: float = flag(0.45, "evaluation NMS IoU threshold")
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    workers: int = flag(4, "data loader worker processes")
    seed: int = flag(0, "seed for shuffling, augmentation and initialisation")
    resume: str | None = flag(None, "resume model/<run>/last.pt, or the PATH given", const="last")
    weights: str | None = flag(None, "initialise the model from a checkpoint of this project")
    pretrained: str | None = flag(
        None, "ImageNet backbone weights: torchvision's (no PATH) or a local PATH", const="default"
    )
    darknet_weights: str | None = flag(None, "darknet .weights file, e.g. darknet19_448.conv.23")
    amp: bool = flag(True, "mixed precision on CUDA (bf16 where supported, else fp16)")
    eval_every: int = flag(1, "evaluate every N epochs (and always after the last)")
    num_vis_images: int = flag(4, "validation images drawn to tensorboard each evaluation")
    log_dir: str = flag("logs", "tensorboard folder")
    model_dir: str = flag("model", "checkpoint folder")

    def __post_init__(self) -> None:
        _check(self.model in MODELS, f"--model {self.model!r}: choose one of {MODELS}")
        _check(self.assignment in ("global", "darknet"), "--assignment: global or darknet")
        _check(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r}: one of {OPTIMIZERS}")
        for name in ("img_size", "eval_img_size", "min_size", "max_size"):
            value = getattr(self, name)
            _check(value > 0 and value % 32 == 0, f"--{_kebab(name)} {value}: use a multiple of 32")
        _check(self.min_size <= self.max_size, "--min-size must not exceed --max-size")
        for name in ("epochs", "batch_size", "accum", "multi_scale_every", "eval_every"):
            _check(getattr(self, name) >= 1, f"--{_kebab(name)} must be at least 1")
        _check(self.lr > 0, f"--lr {self.lr}: must be positive")
        _check(self.workers >= 0, "--workers must be >= 0")
        _check(list(self.lr_steps) == sorted(self.lr_steps), "--lr-steps must be increasing")
        if self.darknet_weights and self.model not in ("darknet19", "tiny"):
            raise ValueError(f"--darknet-weights needs a darknet model, not --model {self.model}")
        for spec in (*self.train_sets, self.val_set):
            _check(spec.count(":") == 1, f"image set {spec!r}: write NAME:SPLIT, e.g. 2007:test")


@dataclass(frozen=True)
class TestConfig:
    """Evaluation of trained weights on a validation set."""

    __test__ = False  # not a pytest test class, despite the name

    weights: str | None = flag(None, "checkpoint .pt of this project, or darknet .weights")
    model: str = flag("darknet19", f"model for darknet .weights files, one of {MODELS}")
    data_root: str = flag("data/VOCdevkit", "VOCdevkit folder")
    val_set: str = flag("2007:test", "NAME:SPLIT to evaluate")
    classes: str | None = flag(None, "classes file (default: the checkpoint's, else VOC's)")
    anchors: str | None = flag(None, "anchors JSON (default: the checkpoint's, else darknet's)")
    demo: bool = flag(False, "evaluate on the demo dataset's val split")
    strict: bool = flag(False, "stop at an unknown class name instead of skipping the object")
    img_size: int = flag(416, "evaluation size")
    conf_threshold: float = flag(0.005, "score threshold")
    nms_threshold: float = flag(0.45, "NMS IoU threshold")
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    batch_size: int = flag(16, "images per batch")
    workers: int = flag(4, "data loader worker processes")
    amp: bool = flag(True, "half precision on CUDA")
    out: str = flag("model/test", "output folder for metrics.json, pr_curves.png, detections/")
    num_vis_images: int = flag(8, "validation images drawn into OUT/detections/")
    fps_iters: int = flag(50, "timed batch-1 forward passes for the FPS figures")
    save_voc_results: str | None = flag(None, "write comp4_det_test_<class>.txt files here")

    def __post_init__(self) -> None:
        _check(self.model in MODELS, f"--model {self.model!r}: choose one of {MODELS}")
        _check(self.img_size % 32 == 0, f"--img-size {self.img_size}: use a multiple of 32")
        _check(self.batch_size >= 1 and self.workers >= 0, "--batch-size >= 1, --workers >= 0")
        _check(self.val_set.count(":") == 1, f"--val-set {self.val_set!r}: write NAME:SPLIT")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def build_parser(preset, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``preset``'s dataclass, defaulting to it."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a misspelt flag must fail, not match a longer one
    )
    hints = typing.get_type_hints(type(preset))
    for item in dataclasses.fields(preset):
        option, default = f"--{_kebab(item.name)}", getattr(preset, item.name)
        kind, help_text = hints[item.name], item.metadata.get("help", "")
        kwargs = {"dest": item.name, "default": default, "help": help_text}
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is tuple:
            elem = typing.get_args(kind)[0]
            parser.add_argument(
                option, nargs="+", type=elem, metavar=elem.__name__.upper(), **kwargs
            )
        elif "const" in item.metadata:
            parser.add_argument(option, nargs="?", const=item.metadata["const"], **kwargs)
            if item.name == "pretrained":
                parser.add_argument(
                    "--no-pretrained",
                    dest=item.name,
                    action="store_const",
                    const=None,
                    help="train the backbone from random weights",
                )
        else:
            elem = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            names = (option, item.metadata["alias"]) if "alias" in item.metadata else (option,)
            parser.add_argument(*names, type=elem, **kwargs)
    return parser


def parse_config(preset, argv: list[str] | None = None, description: str | None = None):
    """Apply command-line overrides to a preset; unknown flags exit with an error."""
    args = build_parser(preset, description).parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    try:
        return dataclasses.replace(preset, **values)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def config_to_dict(config) -> dict:
    """Plain JSON-able data: tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls, data: dict):
    """Inverse of :func:`config_to_dict`; keys the class no longer has are an error."""
    names = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config has unknown fields {unknown}; was it written by another version?")
    hints = typing.get_type_hints(cls)
    values = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in data.items()}
    return cls(**values)


def save_config_json(config, path: str | Path) -> None:
    """Write the resolved config beside the checkpoints (atomically)."""
    atomic_write_text(path, json.dumps(config_to_dict(config), indent=2) + "\n")


@dataclass(frozen=True)
class DownloadConfig:
    """Pascal VOC download into ROOT/VOCdevkit (download_voc.py)."""

    root: str = flag("data", "folder to extract into: ROOT/VOCdevkit/VOC2007, .../VOC2012")
    items: tuple[str, ...] = flag(tuple(VOC_TARBALLS), f"any of {', '.join(VOC_TARBALLS)}")
    mirror: str | None = flag(None, "http(s):// or file:// URL of a folder holding the tarballs")
    tarballs: str | None = flag(None, "folder holding tarballs downloaded by hand (md5-checked)")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.items) - set(VOC_TARBALLS))
        _check(bool(self.items) and not unknown, f"--items {unknown}: any of {list(VOC_TARBALLS)}")
        if self.mirror is not None:
            check_mirror(self.mirror)
        _check(bool(self.root), "--root: give a folder, e.g. data")


@dataclass(frozen=True)
class ImportConfig:
    """Labelling-tool output (images + VOC XML folders) into the VOCdevkit layout
    (import_voc.py); --images, --annotations and --out are required."""

    images: str | None = flag(None, "folder of the images (.jpg, .jpeg, .png, .bmp)")
    annotations: str | None = flag(None, "folder of the VOC XML files, one per image")
    out: str | None = flag(None, "new folder data/NAME; NAME becomes the set name (NAME:train)")
    val: float = flag(0.2, "share of the images in the val split")
    seed: int = flag(0, "seed of the train/val split")
    link: bool = flag(False, "symlink the images instead of copying them")

    def __post_init__(self) -> None:
        _check(0.0 < self.val < 1.0, f"--val {self.val}: give a share between 0 and 1, e.g. 0.2")

    def missing_flags(self) -> list[str]:
        """The required flags not given."""
        names = ("images", "annotations", "out")
        return [f"--{name}" for name in names if getattr(self, name) is None]
