"""Train the tiny model for 6 steps, checkpointing every 3; optionally die by SIGKILL or resume.

    python tests/dist_scripts/resume_run.py --out DIR [--stop-after 3 | --kill-after 4] [--resume]

Writes DIR/result.json (the final log history and a parameter checksum) when the run finishes.
tests/test_resume.py compares an uninterrupted run with interrupted-and-resumed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import tiny_llama, word_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "where is the capital of China", "completion": "The capital is Beijing"},
    {"prompt": "who wrote this book", "completion": "it was written by I do not know"},
    {"prompt": "a", "completion": "yes"},
    {"prompt": "what city", "completion": "Paris"},
    {"prompt": "is it a big city", "completion": "yes it is a big city and a small river"},
] * 4


class KillAfter(TrainerCallback):
    """SIGKILL this process at the end of a step: no cleanup, as a preempted job."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StopAt(TrainerCallback):
    """Stop cleanly at the end of a step, saving a checkpoint (an interrupted, not a killed, run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = True


def build_trainer(out: str, callbacks: list, **overrides) -> ShiftLossTrainer:
    """The run of this script: 6 steps of the tiny model, 2 x 2 rows per step, a checkpoint every 3."""
    options = dict(
        output_dir=out,
        max_length=12,
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_steps=3,
        save_strategy="steps",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return ShiftLossTrainer(
        model=tiny_llama(),
        args=ShiftLossArguments(**(options | overrides)),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=word_tokenizer(),
        callbacks=callbacks,
    )


def result(trainer: ShiftLossTrainer) -> dict:
    """What two runs must share to be the same run: every log line and every parameter."""
    parameters = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    history = [
        # Timings differ; the closing train_loss of a resumed call averages that call's steps (stock Trainer).
        {k: v for k, v in entry.items() if not k.endswith(("runtime", "per_second")) and k != "train_loss"}
        for entry in trainer.state.log_history
    ]
    return {"history": history, "parameters": parameters.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop cleanly (and save) after this step"
    )
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    callbacks = [KillAfter(options.kill_after)] if options.kill_after else []
    callbacks += [StopAt(options.stop_after)] if options.stop_after else []
    trainer = build_trainer(options.out, callbacks)
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    with open(os.path.join(options.out, "result.json"), "w", encoding="utf-8") as file:
        json.dump(result(trainer), file)


if __name__ == "__main__":
    main()
