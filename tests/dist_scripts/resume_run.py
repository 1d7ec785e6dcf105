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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop cleanly (and save) after this step"
    )
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    args = ShiftLossArguments(
        output_dir=options.out,
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
    callbacks = [KillAfter(options.kill_after)] if options.kill_after else []
    callbacks += [StopAt(options.stop_after)] if options.stop_after else []
    trainer = ShiftLossTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=word_tokenizer(),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    parameters = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    history = [
        # Timings differ; the closing train_loss of a resumed call averages that call's steps (stock Trainer).
        {k: v for k, v in entry.items() if not k.endswith(("runtime", "per_second")) and k != "train_loss"}
        for entry in trainer.state.log_history
    ]
    with open(os.path.join(options.out, "result.json"), "w", encoding="utf-8") as file:
        json.dump({"history": history, "parameters": parameters.tolist()}, file)


if __name__ == "__main__":
    main()
