"""``--demo``: the generated demo dataset in place of the configured one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from utils.demo import DEMO_CLASSES_FILE, generate_demo_dataset
from yolo.config import DEMO_ROOT
from yolo.runtime import Runtime


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
