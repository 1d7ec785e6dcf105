"""Evaluate the tiny model on N raw rows with ShiftLossTrainer; rank 0 writes the metrics.

    accelerate launch --multi_gpu --num_processes 2 ... tests/dist_scripts/evaluate.py --out DIR --rows 5

tests/test_distributed.py compares two ranks with one process: the sampler's padding duplicates
must not count, so eval_loss and eval_trained_tokens are equal for even and uneven sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from datasets import Dataset

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import leave_process_group, tiny_llama, word_tokenizer  # noqa: E402

WORDS = "where is the capital of China The Beijing what France Paris a city big small river".split()


def rows(count: int) -> list[dict]:
    """Rows whose answers have 1 to 7 words, so that every row's trained-token count differs."""
    return [
        {"prompt": " ".join(WORDS[i % 5 : i % 5 + 3]), "completion": " ".join(WORDS[5 : 5 + 1 + i % 7])}
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--batch", type=int, default=2)
    options = parser.parse_args()
    args = ShiftLossArguments(
        output_dir=os.path.join(options.out, "trainer"),
        per_device_eval_batch_size=options.batch,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = ShiftLossTrainer(
        model=tiny_llama(),
        args=args,
        eval_dataset=Dataset.from_list(rows(options.rows)),
        processing_class=word_tokenizer(),
    )
    metrics = trainer.evaluate()
    if trainer.accelerator.is_main_process:
        metrics["world_size"] = trainer.accelerator.num_processes
        with open(os.path.join(options.out, "metrics.json"), "w", encoding="utf-8") as file:
            json.dump(metrics, file)
    leave_process_group(trainer.accelerator)


if __name__ == "__main__":
    main()
