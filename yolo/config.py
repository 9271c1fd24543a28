"""Run configuration: frozen dataclasses whose fields are the command-line flags.

Each field becomes one ``--kebab-case`` flag (:mod:`yolo.flags` builds the parser). Entry
scripts hold a preset instance and call :func:`yolo.cli.run`, so the three train scripts differ
only in their presets. Every value is checked in ``__post_init__``, before any work starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import MappingProxyType

from utils.darknet_aug import AUGMENT_ON
from utils.darknet_aug import DARKNET_AUGMENTATION as AUG
from utils.download import VOC_TARBALLS, check_mirror
from yolo.flags import flag, kebab
from yolo.names import ASSIGNMENTS, DARKNET_NAMES, MODEL_NAMES

MODELS = MODEL_NAMES
OPTIMIZERS = ("sgd", "adamw")
EXPORTERS = ("torchscript", "dynamo")
EXPORT_FORMATS = ("onnx", "pt", "safetensors")
# Opsets each exporter of torch 2.x writes natively; dynamo converts anything older than 18.
OPSET_RANGES = {"torchscript": (13, 20), "dynamo": (18, 23)}
MAX_K = 64  # most anchors kmeans.py makes
DEMO_ROOT = "data/demo"
DEVICE_HELP = "auto | cpu | cuda | cuda:N"
DATA_FORMATS = ("voc", "coco", "yolo")
DATA_HELP = (
    "dataset, format from the path: a VOCdevkit folder, a COCO instances_*.json or folder with "
    "annotations/, a YOLO data.yaml or folder with images/ and labels/ (replaces --data-root)"
)
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# darknet's cfg/yolov2.cfg on COCO: Darknet-19, its anchors, 64 images a step, lr 1e-3 with a
# 1000-step burn-in, max_batches 500200 with /10 at 400000 and 450000: at train2017's 118,287
# images 271 epochs with steps at 216 and 243; multi-scale 320..608, evaluated at 608.
DARKNET_COCO = {
    "model": "darknet19",
    "anchors": "yolov2",
    "epochs": 271,
    "lr_steps": (216, 243),
    "eval_img_size": 608,
}
# ``--preset small``: a small model from scratch that learns a dataset of a few hundred images
# on a 2-core CPU in under an hour (import_voc.py prints it; the Makefile's demo shortens it).
SMALL_DATA = {
    "model": "tiny",
    "img_size": 256,
    "eval_img_size": 256,
    "multi_scale": False,
    "optimizer": "adamw",
    "lr": 1e-3,
    "batch_size": 8,
    "accum": 1,
    "epochs": 60,
    "lr_steps": (45, 55),
    "ema": True,  # per-epoch mAP of a few hundred images swings by 0.1: evaluate the average
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint."""

    PRESETS = MappingProxyType(
        {"small": SMALL_DATA, "coco": DARKNET_COCO}
    )  # --preset NAME (not annotated: no field)
    # a checkpoint written before a flag existed ran with this value (yolo.flags.config_from_dict)
    BEFORE_FLAGS = MappingProxyType({"ema_share": 0.1})

    model: str = flag("darknet19", "backbone", choices=MODELS)
    # --run-name too: torchrun's parser reads a bare --run as an abbreviation of its --run-path
    run: str = flag("yolov2", "run name: logs/<run>/ and model/<run>/", alias="--run-name")
    data_root: str = flag("data/VOCdevkit", "VOCdevkit folder holding VOC2007/, VOC2012/")
    data: str | None = flag(None, DATA_HELP)
    data_format: str | None = flag(None, "force the format of --data", choices=DATA_FORMATS)
    train_sets: tuple[str, ...] = flag(("2007:trainval", "2012:trainval"), "NAME:SPLIT ...")
    val_set: str = flag("2007:test", "NAME:SPLIT evaluated every --eval-every epochs")
    classes: str | None = flag(None, "classes file, one name per line (default: VOC's 20)")
    anchors: str | None = flag(
        None, "anchors JSON from kmeans.py, or yolov2 for darknet's COCO set (default: its VOC set)"
    )
    scale_anchors: bool = flag(
        False, "scale --anchors fitted at another size (its img_size) to --eval-img-size's grid"
    )
    demo: bool = flag(False, "generate the demo dataset if missing and train on it")
    epochs: int = flag(160, "number of epochs")
    batch_size: int = flag(16, "images per forward pass (per GPU)")
    accum: int = flag(4, "batches accumulated per optimizer step (64 = batch * accum * GPUs)")
    img_size: int = flag(416, "training size when multi-scale is off")
    eval_img_size: int = flag(416, "evaluation size (test, detect and export default to it)")
    multi_scale: bool = flag(True, "a random size in --min-size..--max-size every few batches")
    multi_scale_every: int = flag(10, "batches between multi-scale size changes")
    min_size: int = flag(320, "smallest multi-scale size (a multiple of 32)")
    max_size: int = flag(608, "largest multi-scale size (a multiple of 32)")
    optimizer: str = flag(
        "sgd", "sgd is darknet's; adamw converges in fewer steps", choices=OPTIMIZERS
    )
    lr: float = flag(1e-3, "peak learning rate")
    momentum: float = flag(0.9, "SGD momentum; AdamW's beta1")
    weight_decay: float = flag(
        5e-4, "weight decay on conv/linear weights, not biases or BN (AdamW: decoupled)"
    )
    burn_in: int = flag(1000, "optimizer steps of darknet's burn-in, lr * (i / burn_in) ** 4")
    burn_in_epochs: int = flag(4, "the burn-in lasts at most this many epochs (small datasets)")
    burn_in_share: float = flag(
        1.0, "the burn-in lasts at most this share of the run's steps (1: no bound; docs)"
    )
    prior_images: int = flag(
        12800, "images over which the loss pulls every predictor to its anchor (darknet's)"
    )
    prior_share: float = flag(
        1.0, "that pull lasts at most this share of the run's images (1: no bound; docs)"
    )
    ema: bool = flag(False, "evaluate and save an EMA of the weights (on in --preset small)")
    ema_decay: float = flag(
        0.9998, "EMA decay of a run of 100k+ steps (shorter: bounded by --ema-share)"
    )
    ema_share: float = flag(
        0.05, "the EMA averages over at most this share of the run's steps (docs/training.md)"
    )
    lr_steps: tuple[int, ...] = flag((60, 90), "epochs at which lr is multiplied by --lr-gamma")
    lr_gamma: float = flag(0.1, "lr factor at each of --lr-steps")
    jitter: float = flag(AUG.jitter, "darknet jitter of the random crop")
    hue: float = flag(AUG.hue, "hue shift, fraction of the colour circle")
    saturation: float = flag(AUG.saturation, "saturation scale up to this or its inverse")
    exposure: float = flag(AUG.exposure, "exposure scale up to this or its inverse")
    flip: float = flag(AUG.flip, "horizontal flip probability")
    augment_on: str = flag(
        "auto",
        "where darknet's augmentation runs: cpu (per image in the loader workers), device "
        "(batched on the training device), auto (device on CUDA, else cpu)",
        choices=AUGMENT_ON,
    )
    keep_difficult: bool = flag(False, "train on difficult objects too (darknet leaves them out)")
    strict: bool = flag(False, "stop at an unknown class name instead of skipping the object")
    assignment: str = flag("global", "loss target assignment", choices=ASSIGNMENTS)
    conf_threshold: float = flag(0.005, "evaluation score threshold")
    nms_threshold: float = flag(0.45, "evaluation NMS IoU threshold")
    device: str = flag("auto", DEVICE_HELP)
    workers: int = flag(4, "data loader worker processes")
    seed: int = flag(0, "seed for shuffling, augmentation and initialisation")
    resume: str | None = flag(
        None,
        "resume model/<run>/last.pt, or the PATH given; auto: resume if last.pt exists, else "
        "start (what a job that its launcher restarts wants)",
        const="last",
    )
    restart_epoch: bool = flag(
        False, "a mid-epoch resume whose training images changed starts that epoch again on "
        "the new data (instead of refusing)"
    )  # fmt: skip
    weights: str | None = flag(
        None, "start from a checkpoint of this project or darknet weights (e.g. yolov2-voc)"
    )
    pretrained: str | None = flag(
        None, "ImageNet backbone weights: torchvision's (no PATH) or a local PATH", const="default"
    )
    darknet_weights: str | None = flag(
        None, "darknet backbone .weights (a file, or the name darknet19_448.conv.23)"
    )
    amp: bool = flag(True, "mixed precision on CUDA (bf16 where supported, else fp16)")
    eval_every: int = flag(1, "evaluate every N epochs (and always after the last)")
    num_vis_images: int = flag(4, "validation images drawn to tensorboard each evaluation")
    log_dir: str = flag("logs", "tensorboard folder")
    model_dir: str = flag("model", "checkpoint folder")

    def __post_init__(self) -> None:
        _check(self.model in MODELS, f"--model {self.model!r}: choose one of {MODELS}")
        _check(self.assignment in ASSIGNMENTS, f"--assignment: one of {ASSIGNMENTS}")
        _check(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r}: one of {OPTIMIZERS}")
        _check_run_name(self.run)
        for name in ("img_size", "eval_img_size", "min_size", "max_size"):
            _check_size(name, getattr(self, name))
        _check(self.min_size <= self.max_size, "--min-size must not exceed --max-size")
        for name in ("epochs", "batch_size", "accum", "multi_scale_every", "eval_every"):
            _check(getattr(self, name) >= 1, f"--{kebab(name)} must be at least 1")
        _check(math.isfinite(self.lr) and self.lr > 0, f"--lr {self.lr}: a positive number")
        for name in ("momentum", "weight_decay", "lr_gamma", "burn_in", "burn_in_epochs",
                     "prior_images"):  # fmt: skip
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"--{kebab(name)} {value}: must be >= 0")
        _check(self.momentum < 1, f"--momentum {self.momentum}: must be below 1")
        for name in ("burn_in_share", "prior_share", "ema_share"):
            value = getattr(self, name)
            _check(0 < value <= 1, f"--{kebab(name)} {value}: a share in (0, 1], e.g. 0.1")
        _check(0 <= self.ema_decay < 1, f"--ema-decay {self.ema_decay}: in [0, 1), e.g. 0.9998")
        _check(self.workers >= 0, "--workers must be >= 0")
        _check(list(self.lr_steps) == sorted(self.lr_steps), "--lr-steps must be increasing")
        _check_thresholds(self.conf_threshold, self.nms_threshold)
        _check(not (self.weights and self.resume), "--weights and --resume together: --resume "
               "continues a run with its own weights; leave out --weights")  # fmt: skip
        if self.darknet_weights and self.model not in DARKNET_NAMES:
            raise ValueError(f"--darknet-weights needs a darknet model, not --model {self.model}")
        for spec in (*self.train_sets, self.val_set):
            _check(spec.count(":") == 1, f"image set {spec!r}: write NAME:SPLIT, e.g. 2007:test")


@dataclass(frozen=True)
class WeightsConfig:
    """The flags that load trained weights, shared by the test, export and detect configs: a
    checkpoint supplies its own model, classes, anchors and size; darknet's .weights take them
    from these flags."""

    weights: str | None = flag(
        None, "checkpoint .pt of this project, darknet .weights, or a name such as yolov2-voc"
    )
    model: str = flag("darknet19", "model for darknet .weights files", choices=MODELS)
    classes: str | None = flag(None, "classes file for .weights (a checkpoint has its own)")
    anchors: str | None = flag(None, "anchors JSON for .weights (a checkpoint has its own)")
    img_size: int | None = flag(None, "network input size (default: the checkpoint's, else 416)")

    def __post_init__(self) -> None:
        _check(self.model in MODELS, f"--model {self.model!r}: choose one of {MODELS}")
        if self.img_size is not None:
            _check_size("img_size", self.img_size)


@dataclass(frozen=True)
class TestConfig(WeightsConfig):
    """Evaluation of trained weights on a validation set."""

    __test__ = False  # not a pytest test class, despite the name

    data_root: str = flag("data/VOCdevkit", "VOCdevkit folder")
    data: str | None = flag(None, DATA_HELP)
    data_format: str | None = flag(None, "force the format of --data", choices=DATA_FORMATS)
    val_set: str = flag("2007:test", "NAME:SPLIT to evaluate")
    demo: bool = flag(False, "evaluate on the demo dataset's val split")
    strict: bool = flag(False, "stop at an unknown class name instead of skipping the object")
    letterbox: bool = flag(False, "resize keeping the aspect ratio (darknet's letterbox_image)")
    conf_threshold: float = flag(0.005, "score threshold")
    nms_threshold: float = flag(0.45, "NMS IoU threshold")
    device: str = flag("auto", DEVICE_HELP)
    batch_size: int = flag(16, "images per batch")
    workers: int = flag(4, "data loader worker processes")
    amp: bool = flag(False, "bf16/fp16 on CUDA: faster, but the numbers move off fp32's")
    out: str = flag("model/test", "output folder for metrics.json, pr_curves.png, detections/")
    num_vis_images: int = flag(8, "validation images drawn into OUT/detections/")
    fps_iters: int = flag(50, "timed batch-1 forward passes for the FPS figures")
    save_voc_results: str | None = flag(None, "write comp4_det_test_<class>.txt files here")
    save_coco_results: str | None = flag(
        None, "write a COCO results JSON here (image_id, category_id, bbox xywh px, score)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.batch_size >= 1 and self.workers >= 0, "--batch-size >= 1, --workers >= 0")
        _check(self.fps_iters >= 1, "--fps-iters must be at least 1")
        _check_thresholds(self.conf_threshold, self.nms_threshold)
        _check(self.val_set.count(":") == 1, f"--val-set {self.val_set!r}: write NAME:SPLIT")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_size(name: str, value: int) -> None:
    _check(value > 0 and value % 32 == 0, f"--{kebab(name)} {value}: use a multiple of 32")


def _check_thresholds(conf_threshold: float, nms_threshold: float) -> None:
    _check(0 <= conf_threshold < 1, f"--conf-threshold {conf_threshold}: a score in [0, 1)")
    _check(0 <= nms_threshold <= 1, f"--nms-threshold {nms_threshold}: an IoU in [0, 1]")


def _check_run_name(run: str) -> None:
    _check(
        bool(_RUN_NAME.fullmatch(run)),
        f"--run {run!r}: use letters, digits, '.', '_' or '-' (it names model/<run>/ and "
        "logs/<run>/)",
    )


@dataclass(frozen=True)
class ExportConfig(WeightsConfig):
    """ONNX export of a checkpoint of this project or of darknet's weights (``img_size``: the
    example input's)."""

    format: str = flag(
        "onnx",
        "onnx, or a file to share a checkpoint of this project: pt (no optimizer state) or "
        "safetensors (no pickle); --out's .onnx suffix becomes .pt or .safetensors",
        choices=EXPORT_FORMATS,
    )
    batch_size: int = flag(1, "batch size of the example input (the fixed one without --dynamic)")
    dynamic: bool = flag(True, "dynamic batch axis")
    dynamic_size: bool = flag(False, "dynamic height and width too (multiples of 32)")
    decode: bool = flag(True, "output boxes [N,P,4] and scores [N,P,C]; else the raw head")
    opset: int = flag(18, "ONNX opset (torchscript: 13-20, dynamo: 18-23)")
    exporter: str = flag("torchscript", "dynamo needs onnxscript", choices=EXPORTERS)
    out: str = flag("model/export/yolov2.onnx", "output .onnx file")
    check: bool = flag(True, "compare onnxruntime with PyTorch on random images")
    tolerance: float = flag(1e-3, "check: largest |onnx - torch| / (1 + max |torch|) accepted")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.exporter in EXPORTERS, f"--exporter {self.exporter!r}: one of {EXPORTERS}")
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        low, high = OPSET_RANGES[self.exporter]
        _check(low <= self.opset <= high, f"--opset {self.opset}: {self.exporter}: {low}-{high}")
        _check(self.tolerance > 0, "--tolerance must be positive")
        _check(
            not (self.exporter == "dynamo" and self.decode and self.dynamic_size),
            "--exporter dynamo cannot export --decode with --dynamic-size (torch.onnx fails on "
            "the grid arithmetic with symbolic sizes): use --exporter torchscript, --no-decode "
            "or --no-dynamic-size",
        )


@dataclass(frozen=True)
class DetectConfig(WeightsConfig):
    """Detection on images, a folder, a video file or a webcam."""

    source: tuple[str, ...] = flag(
        (), "image files and/or folders, one video file, or a webcam index such as 0"
    )
    letterbox: bool = flag(
        False, "resize keeping the aspect ratio (darknet's letterbox_image), grey borders"
    )
    conf_threshold: float = flag(
        0.25, "display threshold: lower scores are neither drawn nor saved (mAP uses 0.005)"
    )
    nms_threshold: float = flag(0.45, "NMS IoU threshold")
    device: str = flag("auto", DEVICE_HELP)
    amp: bool = flag(True, "half precision on CUDA")
    batch_size: int = flag(8, "images (or video frames) per forward pass")
    out: str = flag("model/detect", "output folder for annotated images/video and detections.json")
    show: bool = flag(False, "show results in a window (needs a display); q or Esc stops")
    max_frames: int | None = flag(None, "stop a video or webcam after this many frames")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_thresholds(self.conf_threshold, self.nms_threshold)
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        _check(self.max_frames is None or self.max_frames >= 1, "--max-frames must be >= 1")


def parse_k(spec: str) -> list[int]:
    """``"5"`` -> ``[5]``; ``"1-15"`` -> ``[1, ..., 15]``. Raises ValueError naming the flag."""
    low, dash, high = spec.strip().partition("-")
    try:
        ks = range(int(low), int(high if dash else low) + 1)
    except ValueError:
        ks = range(0)
    _check(
        bool(ks) and ks[0] >= 1 and ks[-1] <= MAX_K,
        f"--k {spec!r}: give a number of anchors such as 5, or a range such as 1-15 (from 1 "
        f"to {MAX_K})",
    )
    return list(ks)


@dataclass(frozen=True)
class KMeansConfig:
    """k-means anchor search on a VOC-format dataset."""

    data_root: str = flag("data/VOCdevkit", "VOCdevkit folder holding VOC2007/, VOC2012/")
    data: str | None = flag(None, DATA_HELP)
    data_format: str | None = flag(None, "force the format of --data", choices=DATA_FORMATS)
    sets: tuple[str, ...] = flag(("2007:trainval", "2012:trainval"), "NAME:SPLIT ... to read")
    classes: str | None = flag(None, "classes file, one name per line (default: VOC's 20)")
    demo: bool = flag(False, "generate the demo dataset if missing and use its train split")
    k: str = flag("5", "number of anchors, or a range such as 1-15")
    restarts: int = flag(10, "k-means++ restarts per k; the highest mean IoU wins")
    max_iter: int = flag(300, "most Lloyd iterations per restart")
    seed: int = flag(0, "seed of the k-means++ draws")
    keep_difficult: bool = flag(False, "cluster difficult boxes too (darknet leaves them out)")
    strict: bool = flag(False, "fail on an object of a class not in the class list (else skip)")
    out_dir: str = flag("model/anchors", "folder for anchors-K.json, *.png and kmeans.json")
    img_size: int = flag(416, "reference input size (multiple of 32): anchors in its grid cells")
    threads: int = flag(1, "torch CPU threads (k-means runs many small ops: 1 is fastest)")

    def __post_init__(self) -> None:
        parse_k(self.k)
        for spec in self.sets:
            _check(spec.count(":") == 1, f"image set {spec!r}: write NAME:SPLIT, e.g. 2007:test")
        for name in ("restarts", "max_iter", "threads"):
            _check(getattr(self, name) >= 1, f"--{kebab(name)} must be at least 1")
        _check_size("img_size", self.img_size)


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
    annotations: str | None = flag(
        None, "folder of VOC XML or YOLO-txt .txt files (+ classes.txt), or a COCO .json file"
    )
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
