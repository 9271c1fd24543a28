"""Where a run executes: device, precision, processes (torchrun + DDP), and stop signals."""

from __future__ import annotations

import logging
import os
import random
import signal
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

# The signals that stop a run cleanly at the next optimizer step; the exit code is 128 + signum.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Runtime:
    """The process's place in the run: its device and rank, and the AMP dtype to use."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    distributed: bool = False  # launched by torchrun: a process group and DDP, even of one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for forward passes (a no-op in fp32)."""
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch on this device; channels_last on CUDA, where convolutions run faster so."""
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


def select_amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); none on the CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def setup_runtime(device_name: str, amp: bool) -> Runtime:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, else gloo),
    also with one process, so that one GPU runs the multi-GPU code path; else run alone."""
    launched = "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name, local_rank)
    if launched and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        _join_process_group(backend, rank, world_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = select_amp_dtype(device, amp)
    return Runtime(device, rank, world_size, amp_dtype, distributed=launched)


def _join_process_group(backend: str, rank: int, world_size: int) -> None:
    """``init_process_group`` over torchrun's store, its keys under this attempt's name.

    An elastic restart reuses the rendezvous store of the attempt before (torchrun shares it
    with the workers), which still holds that attempt's process-group keys: a restarted group
    read them and waited for peers long dead ("connectFullMesh ... Connection refused", or a
    hang). Prefixing the keys by ``TORCHELASTIC_RESTART_COUNT`` gives each attempt its own.
    """
    store, rank, world_size = next(dist.rendezvous("env://", rank, world_size))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"yolo/attempt_{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)


def launcher_restart() -> str | None:
    """``"torchrun restart N"`` or ``"SLURM restart N"`` when the launcher reran this command
    after a failure or a preemption (its restart count is above 0); else None."""
    for variable, launcher in (
        ("TORCHELASTIC_RESTART_COUNT", "torchrun"),
        ("SLURM_RESTART_COUNT", "SLURM"),
    ):
        count = os.environ.get(variable, "0")
        if count.isdigit() and int(count) > 0:
            return f"{launcher} restart {count}"
    return None


def launch_identity() -> dict[str, str]:
    """The launcher's id of this job, the same in each of its restarts: torchrun's run id
    (``--rdzv-id``; a fresh one per ``--standalone`` command) and SLURM's job id. Recorded in
    checkpoints, so that a restart resumes only a checkpoint of its own job."""
    names = {"torchelastic_run_id": "TORCHELASTIC_RUN_ID", "slurm_job_id": "SLURM_JOB_ID"}
    return {key: os.environ[name] for key, name in names.items() if os.environ.get(name)}


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seeds the global RNGs that initialisation uses; data order and augmentation are seeded
    per item by the sampler, so they do not depend on this."""
    random.seed(seed)
    torch.manual_seed(seed)


def gather_to_main(items: list, runtime: Runtime) -> list:
    """Concatenate per-rank lists on every rank (in rank order); identity for one process."""
    if not runtime.distributed:
        return items
    gathered: list[list | None] = [None] * runtime.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def broadcast_flag(flag: bool, runtime: Runtime) -> bool:
    """True on every rank when any rank says True (used for stop requests)."""
    if not runtime.distributed:
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopRequest:
    """Turns SIGINT, SIGTERM and SIGHUP into a flag the loop checks at a safe point.

    A second signal of the same kind stops at once, as the default handler would (Ctrl-C twice
    stops a run that is stuck). ``exit_code`` is the shell's ``128 + signal`` (130 for Ctrl-C,
    143 for SIGTERM, 129 for SIGHUP).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning(
            "%s received: saving a checkpoint at the next step, then stopping "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else 0
