"""Soak test: 2,000 optimizer steps of the tiny model with logging, evaluation and checkpointing every 100.

    .venv/bin/python benchmarks/soak.py [--steps 2000] [--out /tmp/soak]

Reports the process's resident memory and the wall time per step at step 100 and at the last step:
memory must not grow by more than 5% (no leak in the loss metrics, the eval sums, the checkpoints'
saved state or the data path), and steps must not slow down. Writes benchmarks/results_soak.json.
Outside the default test suite (it takes a few minutes); docs/performance.md records its results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from datasets import Dataset
from harness import loadavg, resident_bytes
from transformers import TrainerCallback

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from helpers import tiny_llama, word_tokenizer  # noqa: E402

WORDS = "where is the capital of China The Beijing what France Paris a city big small river".split()


class Probe(TrainerCallback):
    """Resident memory and the mean wall time of the last 100 steps, sampled every 100 steps."""

    def __init__(self) -> None:
        self.samples: list[dict] = []
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % 100 == 0:
            now = time.perf_counter()
            self.samples.append(
                {
                    "step": state.global_step,
                    "rss_mib": resident_bytes("VmRSS") / 2**20,
                    "seconds_per_step": (now - self.last) / 100,
                }
            )
            self.last = now


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="/tmp/hf_shift_loss_soak")
    options = parser.parse_args()
    rows = [
        {
            "prompt": " ".join(WORDS[i % 7 : i % 7 + 4]),
            "completion": " ".join(WORDS[(i * 3) % 9 : (i * 3) % 9 + 1 + i % 6]),
        }
        for i in range(256)
    ]
    args = ShiftLossArguments(
        output_dir=options.out,
        max_length=16,
        max_steps=options.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=100,
        eval_strategy="steps",
        eval_steps=100,
        save_strategy="steps",
        save_steps=100,
        save_total_limit=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    probe = Probe()
    trainer = ShiftLossTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:32]),
        processing_class=word_tokenizer(),
        callbacks=[probe],
    )
    start = time.perf_counter()
    trainer.train()
    first, last = probe.samples[0], probe.samples[-1]
    result = {
        "steps": options.steps,
        "wall_s": round(time.perf_counter() - start, 1),
        "rss_mib_at_step_100": round(first["rss_mib"], 1),
        "rss_mib_at_last_step": round(last["rss_mib"], 1),
        "rss_growth": round(last["rss_mib"] / first["rss_mib"] - 1, 4),
        "ms_per_step_at_100": round(1000 * first["seconds_per_step"], 2),
        "ms_per_step_at_last": round(1000 * last["seconds_per_step"], 2),
        "final_total_trained_tokens": [e for e in trainer.state.log_history if "total_trained_tokens" in e][
            -1
        ]["total_trained_tokens"],
        "load_average": loadavg().split(),
        "samples": probe.samples,
    }
    with open(os.path.join(HERE, "results_soak.json"), "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)
    print({key: value for key, value in result.items() if key != "samples"})
    if result["rss_growth"] > 0.05:
        raise SystemExit(f"resident memory grew by {result['rss_growth']:.1%} (> 5%)")


if __name__ == "__main__":
    main()
