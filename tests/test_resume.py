"""Resuming continues every count: the same parameters and the same log lines as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "resume_run.py")

pytestmark = pytest.mark.slow


def _run(out, *options: str, expect_kill: bool = False) -> dict | None:
    environment = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    process = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(out), *options],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if expect_kill:
        assert process.returncode == -9, process.stderr[-3000:]
        return None
    assert process.returncode == 0, process.stderr[-3000:]
    with open(os.path.join(out, "result.json"), encoding="utf-8") as file:
        return json.load(file)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("whole"))


def _assert_same_run(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["parameters"] == uninterrupted["parameters"]  # bit-identical
    assert resumed["history"] == uninterrupted["history"]  # every log line, every count


def test_uninterrupted_run_logs_the_counts(uninterrupted):
    logged = [entry for entry in uninterrupted["history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    totals = [entry["total_trained_tokens"] for entry in logged]
    assert totals == [
        2 * logged[0]["trained_tokens"],
        totals[0] + 2 * logged[1]["trained_tokens"],
        totals[-1],
    ]
    assert "data/truncated_tokens" in logged[0] and "data/truncated_tokens" not in logged[1]


def test_stop_at_3_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    _run(tmp_path, "--stop-after", "3")
    assert os.path.isfile(tmp_path / "checkpoint-3" / "hf_shift_loss_metrics_0.json")
    _assert_same_run(_run(tmp_path, "--resume"), uninterrupted)


def test_sigkill_after_checkpoint_3_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    _run(tmp_path, "--kill-after", "4", expect_kill=True)
    assert not os.path.exists(tmp_path / "checkpoint-6")
    _assert_same_run(_run(tmp_path, "--resume"), uninterrupted)
