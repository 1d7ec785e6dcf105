"""Two ranks train on raw rows that the trainer prepares; each rank writes the data counts it logged.

    accelerate launch --multi_gpu --num_processes 2 ... tests/dist_scripts/count_data.py --out DIR --max-length 8

tests/test_distributed.py compares them with the counts of one process: the counts are made once per
dataset where it is prepared, so no rank sees another's half, and none is counted twice.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

from datasets import Dataset

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import leave_process_group, tiny_llama, word_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "where is the capital of China", "completion": "The capital is Beijing"},
    {"prompt": "who wrote this book", "completion": "I do not know"},
    {"prompt": "a", "completion": "yes"},
    {"prompt": "is it a big city", "completion": "no"},
] * 3


def main() -> None:
    faulthandler.dump_traceback_later(90, exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-length", type=int, required=True)
    options = parser.parse_args()
    args = ShiftLossArguments(
        output_dir=os.path.join(options.out, "trainer"),
        max_length=options.max_length,
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
    )
    trainer = ShiftLossTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=word_tokenizer(),
    )
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "data/truncated_tokens" in entry)
    with open(os.path.join(options.out, f"rank{trainer.accelerator.process_index}.json"), "w") as file:
        json.dump({"logged": logged, "world_size": trainer.accelerator.num_processes}, file)
    leave_process_group(trainer.accelerator)


if __name__ == "__main__":
    main()
