"""Resuming continues every count: the same parameters and the same log lines as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_shift_loss.checkpoint import STATE_KEY, check_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "resume_run.py")
KILL_SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "kill_in_save.py")

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
    with open(tmp_path / "checkpoint-3" / "trainer_state.json", encoding="utf-8") as file:
        saved = json.load(file)["stateful_callbacks"][STATE_KEY]  # inside the stock state: no window
    assert saved["ranks"][0]["window_trained_tokens"] > 0  # step 3 is past the log line of step 2
    _assert_same_run(_run(tmp_path, "--resume"), uninterrupted)


def test_sigkill_after_checkpoint_3_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    _run(tmp_path, "--kill-after", "4", expect_kill=True)
    assert not os.path.exists(tmp_path / "checkpoint-6")
    _assert_same_run(_run(tmp_path, "--resume"), uninterrupted)


# What resume_from_checkpoint=True says after a SIGKILL at each point of the save of checkpoint-4
# (tests/dist_scripts/kill_in_save.py): the broken file is named, or the run continues exactly.
REFUSED = {
    "before_optimizer": "optimizer.pt is missing",
    "inside_optimizer": "optimizer.pt is unreadable",
    "before_rng_state": "rng_state.pth is missing",
    "inside_trainer_state": "trainer_state.json is unreadable",
    "before_rotation": None,  # checkpoint-4 is complete: resumed from it
}


def test_sigkill_inside_the_save_resumes_exactly_or_names_the_broken_file(tmp_path):
    environment = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    process = subprocess.run(
        [sys.executable, KILL_SCRIPT, "--out", str(tmp_path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    with open(tmp_path / "report.json", encoding="utf-8") as file:
        report = json.load(file)
    uninterrupted = report["uninterrupted"]
    assert "error" not in uninterrupted, uninterrupted.get("traceback")
    assert set(report["points"]) == set(REFUSED)
    for point, problem in REFUSED.items():
        entry = report["points"][point]
        assert entry["killed"] == {"signal": 9}, point
        assert entry["checkpoints"] == ["checkpoint-2", "checkpoint-4"], point  # killed before rotation
        resumed = entry["resumed"]
        if problem is None:
            _assert_same_run(resumed, uninterrupted)
            continue
        checkpoint = tmp_path / point / "checkpoint-4"
        assert resumed["error"].startswith(
            f"ValueError: cannot resume from checkpoint {checkpoint}: {problem}"
        )
        assert "(in " in resumed["error"] and ": checkpoint-2)" in resumed["error"], resumed["error"]
        _assert_same_run(entry["resumed_without_it"], uninterrupted)  # from checkpoint-2


def _complete_checkpoint(folder, state) -> None:
    import torch

    folder.mkdir()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"stateful_callbacks": state}))


def test_a_checkpoint_without_the_project_state_is_refused(tmp_path):
    _complete_checkpoint(tmp_path / "checkpoint-1", {STATE_KEY: {"total_trained_tokens": 3}})
    assert check_checkpoint(str(tmp_path / "checkpoint-1")) == {"total_trained_tokens": 3}
    _complete_checkpoint(tmp_path / "checkpoint-2", {})  # e.g. saved by transformers.Trainer
    with pytest.raises(ValueError, match=r"checkpoint-2: trainer_state.json has no 'hf_shift_loss' state"):
        check_checkpoint(str(tmp_path / "checkpoint-2"))
    os.remove(tmp_path / "checkpoint-1" / "scheduler.pt")
    with pytest.raises(ValueError, match=r"checkpoint-1: scheduler.pt is missing.*\(in .*: checkpoint-2\)"):
        check_checkpoint(str(tmp_path / "checkpoint-1"))
    assert check_checkpoint(str(tmp_path / "checkpoint-1"), optimizer_state=False)  # save_only_model
    with pytest.raises(ValueError, match="rng_state_1.pth is missing"):
        check_checkpoint(str(tmp_path / "checkpoint-2"), process_index=1, world_size=2, deepspeed=True)
