"""SIGKILL a run inside its checkpoint save at named points, resume, and report what each resume did.

    python tests/dist_scripts/kill_in_save.py --out DIR

The run of resume_run.py with a checkpoint every 2 steps and ``save_total_limit=1``, killed while
saving checkpoint-4 at each point of :data:`POINTS` (what is on disk then is in the name). Each run
is a forked child of this process (the imports are paid once), so the whole test takes seconds.
Writes DIR/report.json: the uninterrupted run, and for every point whether the child died by SIGKILL,
what ``resume_from_checkpoint=True`` gave (the run, or the error), and, after an error, the run
resumed once the broken checkpoint is deleted. tests/test_resume.py reads it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import traceback

import torch
import transformers.trainer
from resume_run import build_trainer, result
from transformers import TrainerState

KILL_STEP = 4
RUN = {"save_steps": 2, "save_total_limit": 1, "logging_steps": 3}
POINTS = (
    "before_optimizer",  # the weights are written, nothing else
    "inside_optimizer",  # optimizer.pt cut in the middle
    "before_rng_state",  # optimizer.pt and scheduler.pt written, no rng_state.pth
    "inside_trainer_state",  # trainer_state.json cut in the middle
    "before_rotation",  # checkpoint-4 complete; checkpoint-2 not yet rotated away
)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half_and_die(path: str, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])
    _die()


def _arm(trainer, point: str) -> None:
    """Make the save of step KILL_STEP die at ``point`` (patched in this child process only)."""

    def at_kill_step() -> bool:
        return trainer.state.global_step == KILL_STEP

    if point == "before_optimizer":
        original = trainer._save_optimizer_and_scheduler
        trainer._save_optimizer_and_scheduler = lambda out: _die() if at_kill_step() else original(out)
    elif point == "inside_optimizer":
        save = torch.save

        def cut_save(obj, path, *args, **kwargs):
            if str(path).endswith("optimizer.pt") and at_kill_step():
                buffer = io.BytesIO()
                save(obj, buffer)
                _write_half_and_die(str(path), buffer.getvalue())
            return save(obj, path, *args, **kwargs)

        torch.save = cut_save
    elif point == "before_rng_state":
        original_rng = trainer._save_rng_state
        trainer._save_rng_state = lambda out: _die() if at_kill_step() else original_rng(out)
    elif point == "inside_trainer_state":
        save_to_json = TrainerState.save_to_json

        def cut_json(state, path):
            if at_kill_step() and os.path.basename(os.path.dirname(path)) == f"checkpoint-{KILL_STEP}":
                save_to_json(state, path)
                with open(path, "rb") as file:
                    _write_half_and_die(path, file.read())
            return save_to_json(state, path)

        TrainerState.save_to_json = cut_json
    elif point == "before_rotation":
        rotate = transformers.trainer.rotate_checkpoints
        transformers.trainer.rotate_checkpoints = lambda **kw: _die() if at_kill_step() else rotate(**kw)
    else:
        raise ValueError(f"unknown point {point!r}; one of {POINTS}")


def _in_child(job) -> dict:
    """Run ``job`` in a forked child; its JSON answer, or how it died."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            answer = job()
        except Exception as error:  # noqa: BLE001 - the error is the answer
            answer = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        with os.fdopen(write, "w") as pipe:
            json.dump(answer, pipe)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return json.loads(text)


def _train(out: str, point: str | None = None, resume: bool = False) -> dict:
    trainer = build_trainer(out, [], **RUN)
    if point is not None:
        _arm(trainer, point)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return result(trainer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--points", nargs="*", default=list(POINTS))
    options = parser.parse_args()
    report = {"uninterrupted": _in_child(lambda: _train(os.path.join(options.out, "whole"))), "points": {}}
    for point in options.points:
        out = os.path.join(options.out, point)
        entry = {"killed": _in_child(lambda out=out, point=point: _train(out, point))}
        entry["checkpoints"] = sorted(name for name in os.listdir(out) if name.startswith("checkpoint-"))
        entry["resumed"] = _in_child(lambda out=out: _train(out, resume=True))
        if "error" in entry["resumed"]:
            shutil.rmtree(os.path.join(out, f"checkpoint-{KILL_STEP}"))
            entry["resumed_without_it"] = _in_child(lambda out=out: _train(out, resume=True))
        report["points"][point] = entry
    with open(os.path.join(options.out, "report.json"), "w", encoding="utf-8") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main()
