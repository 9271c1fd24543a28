"""What the bench scripts share: the line naming the machine, and writing the results."""

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
import torchvision

from utils.fileio import atomic_write_text

__all__ = ["RESULTS", "machine_line", "save_results"]

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(torch_threads: str | None = None) -> str:
    """``Machine: <cpu>, N CPUs, T torch threads, versions, load average[, GPU]``; call it when
    the measurements are done, so that the load average covers them. ``torch_threads``
    replaces the thread count (e.g. ``"1 per process"``: ``1 per process torch threads``)."""
    threads = torch_threads or str(torch.get_num_threads())
    line = (
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, {threads} torch threads, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


def save_results(name: str, text: str, payload: dict) -> None:
    """Write ``bench/results/<name>.md`` (``text``) and ``.json`` (``payload``), atomically."""
    atomic_write_text(RESULTS / f"{name}.md", text)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
