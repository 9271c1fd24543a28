"""bench/gpu_check.py end to end in its quick form (what runs without CUDA), and the section
machinery that keeps one failing or stuck section from losing the others."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.common import Budget, Report, SectionTimeout, junit_counts, run_child, run_section

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["setup", "pytest", "train", "inference", "resume", "torchrun"]


@pytest.mark.slow
def test_quick_run_reports_every_section(tmp_path):
    results = sorted(p.name for p in (REPO / "bench/results").iterdir())
    command = [sys.executable, "bench/gpu_check.py", "--quick", "--out-dir", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (REPO / "bench/results").iterdir()) == results
    payload = json.loads((tmp_path / "gpu.json").read_text())
    sections = payload["sections"]
    assert sorted(sections) == sorted(SECTIONS)
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section["note"])
    assert payload["plan"] == "quick" and payload["torch"] == torch.__version__
    if torch.cuda.is_available():
        (tests,) = sections["pytest"]["rows"]
        assert tests["failed"] == tests["errors"] == 0 and tests["passed"] > 0
    train = sections["train"]["rows"]
    loaders = [(row["loader"], row["augment"]) for row in train]
    assert loaders == [(f"{source}", path) for source in ("in memory, pinned", "files, 0 workers")
                       for path in ("cpu", "device")]  # fmt: skip
    assert all(row["images_per_s"] > 0 and 0 <= row["data_share"] <= 1 for row in train)
    inference = sections["inference"]["rows"]
    assert [row["batch"] for row in inference] == [1, 2]
    assert all(row["model_img_s"] > 0 and row["end_to_end_img_s"] > 0 for row in inference)
    (resume,) = sections["resume"]["rows"]
    assert resume["stopped_at"] == "epoch 1, batch 1"  # mid-epoch: 2 batches an epoch
    if not torch.cuda.is_available():  # the CPU is deterministic: the resume is exact
        assert resume["bit_exact"] and resume["max_abs_diff"] == 0
        for name in ("pytest", "torchrun"):
            assert sections[name]["note"].startswith("skipped: no CUDA"), name
        assert "skipped: no CUDA" in sections["inference"]["note"]
    text = (tmp_path / "gpu.md").read_text()
    assert text.index("## 1. pytest -m gpu") < text.index("## 5. torchrun")
    assert "| in memory, pinned |" in run.stdout  # the table prints as it goes


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path, capsys):
    report = Report(tmp_path, "check", "Check", {"device": "test"})

    def broken(budget):
        raise ValueError("no such thing")

    def working(budget):
        report.row("b", value=1.5, left=budget.left() > 0)
        return "fine"

    run_section(report, "a", "1. a", 10, broken)
    run_section(report, "b", "2. b", 10, working)
    payload = json.loads((tmp_path / "check.json").read_text())
    assert payload["device"] == "test"
    assert payload["sections"]["a"]["status"] == "failed"
    assert payload["sections"]["a"]["note"] == "ValueError: no such thing"
    assert payload["sections"]["b"]["status"] == "ok"
    assert payload["sections"]["b"]["rows"] == [{"value": 1.5, "left": True}]
    assert "| 1.5 | True |" in (tmp_path / "check.md").read_text()
    assert "| value | left |" in capsys.readouterr().out


def test_budget_stops_an_item_stuck_past_its_grace():
    start = time.monotonic()
    with pytest.raises(SectionTimeout), Budget(0.05, grace=0.05) as budget:
        time.sleep(5)
    assert time.monotonic() - start < 2 and budget.left() < 0
    with Budget(5, grace=0.05):  # the timer is disarmed on the way out
        pass
    time.sleep(0.2)


def test_junit_counts_reads_passes_failures_and_skips(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_gpu" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_b"/>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_d"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    counts, failed = junit_counts(path)
    assert counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 2}
    assert failed == ["tests.test_gpu::test_a"]


def test_run_child_returns_what_the_function_returned():
    kwargs = {"size": 416, "ok": True}
    assert run_child("builtins", "dict", kwargs, timeout=60) == kwargs
    error = r"(?s)no_such_module.f exited with 1:\n.*ModuleNotFoundError"
    with pytest.raises(RuntimeError, match=error):
        run_child("no_such_module", "f", {}, timeout=60)
