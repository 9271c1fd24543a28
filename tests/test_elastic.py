"""A job that its launcher restarts resumes itself: ``--resume auto``, torchrun's and SLURM's
restart counts, an elastic torchrun job with a worker killed mid-epoch, two "nodes" on one
machine. The torchrun runs use gloo on the CPU over loopback: 8 demo images at 64 pixels in
batches of 2 per process (2 steps an epoch), 2 epochs, the tiny model."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.demo import generate_demo_dataset
from yolo.checkpoint import checkpoint_to_resume, load_checkpoint, resolve_resume, save_checkpoint
from yolo.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one torchrun job; a hang fails the test instead of stalling it
LAUNCH_VARIABLES = ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "SLURM_RESTART_COUNT",
                    "SLURM_JOB_ID")  # fmt: skip


@pytest.fixture
def clean_launch(monkeypatch):
    """No launcher variables from the environment the tests run in."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def config_in(tmp_path: Path, **overrides) -> TrainConfig:
    return TrainConfig(run="t", model_dir=str(tmp_path / "model"), **overrides)


def write_last(tmp_path: Path, launch: dict) -> Path:
    """A stand-in last.pt: what resolving the resume reads of it (the launch id)."""
    path = tmp_path / "model/t/last.pt"
    path.parent.mkdir(parents=True)
    return save_checkpoint({"model": {}, "config": {}, "launch": launch}, path)


def test_resume_auto_resumes_what_exists_else_starts(tmp_path, clean_launch):
    assert resolve_resume(config_in(tmp_path, resume="auto")).resume is None
    write_last(tmp_path, {})
    assert resolve_resume(config_in(tmp_path, resume="auto")).resume == "last"
    assert resolve_resume(config_in(tmp_path, resume="x.pt")).resume == "x.pt"  # as given
    assert resolve_resume(config_in(tmp_path)).resume is None  # not a restart: a new run


@pytest.mark.parametrize(
    ("count", "identity"),
    [
        ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID"),
        ("SLURM_RESTART_COUNT", "SLURM_JOB_ID"),
    ],
)
def test_a_restarted_job_resumes_only_its_own_checkpoint(tmp_path, clean_launch, count, identity):
    key = {"TORCHELASTIC_RUN_ID": "torchelastic_run_id", "SLURM_JOB_ID": "slurm_job_id"}[identity]
    write_last(tmp_path, {key: "job-1"})
    clean_launch.setenv(identity, "job-1")
    clean_launch.setenv(count, "0")  # the first attempt: a run that exists is not resumed
    assert resolve_resume(config_in(tmp_path)).resume is None
    clean_launch.setenv(count, "1")
    assert resolve_resume(config_in(tmp_path)).resume == "last"
    clean_launch.setenv(identity, "job-2")  # another job's run folder: refused as today
    config = resolve_resume(config_in(tmp_path))
    assert config.resume is None
    with pytest.raises(FileExistsError, match=r"--resume auto in a job that may restart"):
        checkpoint_to_resume(config, tmp_path / "model/t", (), torch.zeros(0, 2))


# ------------------------------------------------------------------------ torchrun end to end

KILLER = """
import os, signal, sys
import yolo.build
# rank 1 of the first attempt SIGKILLs itself in its training forward pass number {at}
if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    build, calls = yolo.build.build_train_model, [0]
    def hook(module, args, output):
        calls[0] += module.training
        if module.training and calls[0] == {at}:
            os.kill(os.getpid(), signal.SIGKILL)
    def patched(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(hook)
        return model
    yolo.build.build_train_model = patched
import train_yolov2
sys.exit(train_yolov2.main())
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("elastic_demo")
    return generate_demo_dataset(root, num_train=8, num_val=2, min_size=64, max_size=96, seed=0)


def train_flags(data: Path, folder: Path) -> list[str]:
    return [
        "--data-root", str(data), "--classes", str(data / "demo_classes.txt"),
        "--train-sets", "demo:train", "--val-set", "demo:val", "--model", "tiny",
        "--img-size", "64", "--eval-img-size", "64", "--no-multi-scale", "--optimizer", "adamw",
        "--batch-size", "2", "--accum", "1", "--workers", "0", "--device", "cpu", "--epochs", "2",
        "--num-vis-images", "0", "--run-name", "t", "--model-dir", str(folder / "model"),
        "--log-dir", str(folder / "logs"),
    ]  # fmt: skip


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def environment() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_job(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(folder: Path) -> dict:
    return load_checkpoint(folder / "model/t/last.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """Two processes on one node, uninterrupted: what the other jobs must equal."""
    folder = tmp_path_factory.mktemp("reference")
    script = str(REPO / "train_yolov2.py")
    run_job(torchrun("--standalone", "--nproc_per_node=2", script, *train_flags(data, folder)),
            folder)  # fmt: skip
    state = load_checkpoint(folder / "model/t/last.pt")["state"]
    assert (state["epoch"], state["iteration"], state["seen"]) == (2, 4, 16)
    return folder


@pytest.mark.slow
def test_an_elastic_job_with_a_killed_worker_restarts_and_finishes_the_same(
    tmp_path, data, reference
):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(at=3))  # the first step of epoch 2: mid-epoch
    command = torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1", str(killer),
                       *train_flags(data, tmp_path))  # fmt: skip
    result = run_job(command, tmp_path)
    assert "torchrun restart 1 of this job: resuming" in result.stderr
    assert "failed (exitcode: -9) local_rank: 1" in result.stderr  # the kill did happen
    assert load_checkpoint(tmp_path / "model/t/last.pt")["finished"]
    assert_same_weights(weights(tmp_path), weights(reference))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_as_two_processes_on_one(tmp_path, data, reference):
    node = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes",
                    str(REPO / "train_yolov2.py"), *train_flags(data, tmp_path))  # fmt: skip
    jobs = [
        subprocess.Popen(
            node,
            cwd=tmp_path,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [job.communicate(timeout=TIMEOUT) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.send_signal(signal.SIGKILL)
                job.wait()
    for job, (_, stderr) in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, stderr[-3000:]
    assert_same_weights(weights(tmp_path), weights(reference))


@pytest.mark.slow
def test_the_same_command_with_resume_auto_starts_then_continues(tmp_path, data, clean_launch):
    import train_yolov2

    flags = [*train_flags(data, tmp_path), "--resume", "auto"]
    assert train_yolov2.main([*flags, "--epochs", "1"]) == 0  # starts: nothing to resume
    assert load_checkpoint(tmp_path / "model/t/last.pt")["state"]["epoch"] == 1
    assert train_yolov2.main(flags) == 0  # the same command (2 epochs): continues the run
    saved = load_checkpoint(tmp_path / "model/t/last.pt")
    assert (saved["state"]["epoch"], saved["state"]["iteration"]) == (2, 8)
    assert saved["config"]["resume"] == "last"
