"""Packing on the bundled HumanEval rows: rows per epoch, time per epoch, and why (CPU).

What is measured and how: benchmarks/README.md.

    python benchmarks/bench_packing.py                    # ~10 min on 2 cores; prints markdown tables and
                                                          # writes benchmarks/results_packing.json
    python benchmarks/bench_packing.py --skip-smollm      # tiny model only (about a minute)
    python benchmarks/bench_packing.py --smollm-steps 2   # fewer SmolLM2 steps
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from harness import command_line, loadavg, median_time, timed
from transformers.masking_utils import create_causal_mask
from transformers.trainer_pt_utils import get_length_grouped_indices

from hf_shift_loss.data import Batcher, Encoder, prepare_dataset, resolve_pad_token_id
from hf_shift_loss.data.load import load_tokenizer
from hf_shift_loss.data.pack import pack_rows
from hf_shift_loss.loss import choose_loss_path, count_trained_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
from sft_models import build_tiny_llama, load_model, smollm2_source  # noqa: E402

DATA = os.path.join(ROOT, "recipes", "data", "humaneval_sft.jsonl")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_packing.json")
BATCH = 4
Row = dict[str, list[int]]


# ---------------------------------------------------------------------------------------------- data
def chat_rows() -> datasets.Dataset:
    with open(DATA) as file:
        rows = [json.loads(line) for line in file if line.strip()]
    messages = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        for r in rows
    ]
    return datasets.Dataset.from_dict({"messages": messages})


def layouts_for(tokenizer: Any, raw: datasets.Dataset, max_length: int) -> tuple[dict, dict]:
    """``{layout: [micro-batch = list of rows]}`` for the four layouts, and the prepared datasets' stats."""
    encoder = Encoder(tokenizer, max_length=max_length)
    padded = prepare_dataset(raw, encoder)
    packed = prepare_dataset(raw, encoder, packing=True)
    examples = [
        {"input_ids": i, "labels": lab}
        for i, lab in zip(padded.dataset["input_ids"], padded.dataset["labels"], strict=True)
    ]
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    grouped = get_length_grouped_indices(
        [len(e["input_ids"]) for e in examples], BATCH, generator=torch.Generator().manual_seed(0)
    )
    groups = [[examples[i] for i in order[s : s + BATCH]] for s in range(0, len(order), BATCH)]
    per_batch = []
    for group in groups:
        columns = pack_rows(
            {"input_ids": [e["input_ids"] for e in group], "labels": [e["labels"] for e in group]}, max_length
        )
        per_batch.append(_rows(columns))
    dataset_rows = _rows(packed.dataset.to_dict())
    random.Random(0).shuffle(dataset_rows)
    layouts = {
        "padded": groups,
        "padded, grouped": [
            [examples[i] for i in grouped[s : s + BATCH]] for s in range(0, len(grouped), BATCH)
        ],
        "per-batch packed": per_batch,
        "dataset packed": [dataset_rows[s : s + BATCH] for s in range(0, len(dataset_rows), BATCH)],
    }
    return layouts, {"padded": padded.stats, "packed": packed.stats}


def _rows(columns: dict) -> list[Row]:
    return [
        {"input_ids": i, "labels": lab, "position_ids": p}
        for i, lab, p in zip(columns["input_ids"], columns["labels"], columns["position_ids"], strict=True)
    ]


def sequence_lengths(row: Row) -> list[int]:
    """Lengths of the sequences in a row (packed rows restart ``position_ids`` at 0)."""
    if "position_ids" not in row:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def layout_counts(batches: list[list[Row]]) -> dict[str, float]:
    tokens = sum(len(r["input_ids"]) for b in batches for r in b)
    slots = sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)
    computed = sum(len(b) * max(len(r["input_ids"]) for r in b) ** 2 for b in batches)
    needed = sum(n**2 for b in batches for r in b for n in sequence_lengths(r))
    rows = sum(len(b) for b in batches)
    return {
        "steps": len(batches),
        "rows": rows,
        "tokens": tokens,
        "slots": slots,
        "fill": tokens / slots,
        "mean_width": slots / rows,
        "attention_pairs_computed": computed,  # rows x width^2: what dense sdpa (mask or is_causal) touches
        "attention_pairs_needed": needed,  # sum of L^2 over sequences: what a varlen kernel needs
    }


# ------------------------------------------------------------------------------------------ training
class Stepper:
    """One training micro-step as ShiftLossTrainer runs it (its loss path), plus a plain SGD step."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int) -> None:
        self.model = model.train()
        self.path = choose_loss_path(model, "auto")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
        self.batcher = Batcher(pad_token_id=pad_token_id)

    def __call__(self, rows: list[Row]) -> None:
        batch = self.batcher(rows)
        targets = batch.pop("labels")
        if "position_ids" in batch:
            batch["use_cache"] = False  # what the trainer adds for packed batches
        loss = self.path(
            self.model,
            batch,
            targets,
            shift=True,
            reduction="mean",
            num_items_in_batch=None,
            count_correct=False,
        ).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_whole_epochs(stepper: Stepper, layouts: dict[str, list[list[Row]]], rounds: int) -> dict:
    """Each round runs one whole epoch per layout; the layouts' order rotates between rounds."""
    names = list(layouts)
    for name in names:
        stepper(layouts[name][0])  # warm-up
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, cpu_seconds = timed(lambda batches: [stepper(b) for b in batches], layouts[name])
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    return {
        n: {
            "epoch_s": statistics.median(wall[n]),
            "epoch_cpu_s": statistics.median(cpu[n]),
            "runs_s": wall[n],
        }
        for n in names
    }


def time_sampled_steps(stepper: Stepper, layouts: dict[str, list[list[Row]]], steps: int) -> dict:
    """``steps`` micro-batches per layout spread over the epoch, alternating; epoch = median s/slot x slots."""
    chosen = {n: _spread(len(b), steps) for n, b in layouts.items()}
    for name, batches in layouts.items():
        stepper(batches[chosen[name][-1]])  # warm-up
    per_slot: dict[str, list[float]] = {n: [] for n in layouts}
    per_slot_cpu: dict[str, list[float]] = {n: [] for n in layouts}
    for position in range(steps):
        for name, batches in layouts.items():
            rows = batches[chosen[name][position]]
            slots = len(rows) * max(len(r["input_ids"]) for r in rows)
            seconds, cpu_seconds = timed(stepper, rows)
            per_slot[name].append(seconds / slots)
            per_slot_cpu[name].append(cpu_seconds / slots)
            print(f"    {name}: {len(rows)} x {slots // len(rows)} in {seconds:.1f} s", flush=True)
    out = {}
    for name, batches in layouts.items():
        slots = layout_counts(batches)["slots"]
        out[name] = {
            "epoch_s": statistics.median(per_slot[name]) * slots,
            "epoch_cpu_s": statistics.median(per_slot_cpu[name]) * slots,
            "timed_steps": steps,
            "ms_per_slot": [1e3 * s for s in per_slot[name]],
        }
    return out


def _spread(count: int, wanted: int) -> list[int]:
    wanted = min(wanted, count)
    return [round(i * (count - 1) / max(wanted - 1, 1)) for i in range(wanted)]


# ---------------------------------------------------------------------------------------- diagnosis
def median_ms(function, repeats: int) -> float:
    return 1e3 * median_time(function, repeats)[0]


def diagnose(
    model: torch.nn.Module, pad_token_id: int, padded: list[Row], packed: list[Row], repeats: int
) -> dict:
    """Mask construction vs forward, and the sdpa kernel with each kind of mask, for one micro-batch each."""
    config = model.config
    batcher = Batcher(pad_token_id=pad_token_id)
    out: dict[str, Any] = {}
    for name, rows in (("padded", padded), ("dataset packed", packed)):
        batch = batcher(rows)
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
        mask_inputs = (
            {"attention_mask": batch["attention_mask"], "position_ids": None}
            if "attention_mask" in batch
            else {"attention_mask": None, "position_ids": batch["position_ids"]}
        )
        mask = create_causal_mask(config, embeds, cache=None, **mask_inputs)
        mask_ms = median_ms(
            lambda e=embeds, m=mask_inputs: create_causal_mask(config, e, cache=None, **m), 20
        )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            forward_ms = median_ms(lambda i=inputs: model.model(**i, use_cache=False), repeats)
        out[name] = {
            "shape": list(batch["input_ids"].shape),
            "mask": "None (sdpa is_causal)" if mask is None else f"bool {list(mask.shape)}",
            "mask_ms": mask_ms,
            "backbone_forward_ms": forward_ms,
        }

    # The sdpa kernel alone, forward + backward, on the packed micro-batch's shape.
    rows = packed
    width = max(len(r["input_ids"]) for r in rows)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    generator = torch.Generator().manual_seed(0)

    def qkv(batch: int, length: int) -> tuple[torch.Tensor, ...]:
        shape = (batch, heads, length, head_dim)
        kv_shape = (batch, kv_heads, length, head_dim)
        return (
            torch.randn(shape, generator=generator).requires_grad_(),
            torch.randn(kv_shape, generator=generator).requires_grad_(),
            torch.randn(kv_shape, generator=generator).requires_grad_(),
        )

    q, k, v = qkv(len(rows), width)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    block = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    for index, row in enumerate(rows):
        start = 0
        for length in sequence_lengths(row) + [width - len(row["input_ids"])]:
            block[index, 0, start : start + length, start : start + length] = causal[:length, :length]
            start += length

    def sdpa(mask: torch.Tensor | None) -> None:
        kwargs = {"is_causal": True} if mask is None else {"attn_mask": mask}
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs).sum().backward()

    per_sequence = [qkv(1, n) for r in rows for n in sequence_lengths(r)]

    def varlen() -> None:
        for sq, sk, sv in per_sequence:
            F.scaled_dot_product_attention(sq, sk, sv, is_causal=True, enable_gqa=True).sum().backward()

    kernel = {
        "is_causal (no mask)": median_ms(lambda: sdpa(None), repeats * 3),
        "explicit causal mask": median_ms(lambda: sdpa(causal), repeats * 3),
        "packed block-diagonal mask": median_ms(lambda: sdpa(block), repeats * 3),
        "one call per sequence (varlen)": median_ms(varlen, repeats * 3),
    }
    out["sdpa_fwd_bwd_ms_per_layer"] = {"shape": [len(rows), heads, width, head_dim], **kernel}
    out["layers"] = config.num_hidden_layers
    return out


# -------------------------------------------------------------------------------------------- output
def rows_table(counts: dict[int, dict[str, dict]], stats: dict[int, dict]) -> str:
    lines = [
        "| max_length | layout | examples kept | steps | rows | tokens | slots | fill | mean width | attention pairs computed / needed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for max_length, layouts in counts.items():
        for name, c in layouts.items():
            fill = f"{c['fill']:.1%}"
            if name == "dataset packed":
                fill += f" ({stats[max_length]['packing_fill']:.1%} of capacity)"
            lines.append(
                f"| {max_length} | {name} | {stats[max_length]['examples'] - stats[max_length]['untrained_examples']} "
                f"| {c['steps']} | {c['rows']} | {c['tokens']:,} | {c['slots']:,} | {fill} "
                f"| {c['mean_width']:.0f} | {c['attention_pairs_computed'] / c['attention_pairs_needed']:.2f} |"
            )
    return "\n".join(lines)


def model_flops(model: torch.nn.Module, counts: dict[str, float], trained_tokens: int) -> float:
    """Training FLOPs of an epoch (forward + backward = 3 x forward): decoder matmuls per slot, the
    lm_head per trained token only (the fused loss projects nothing else), attention per computed pair."""
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    body = sum(p.numel() for p in model.parameters()) - embedding * (1 if config.tie_word_embeddings else 2)
    forward = 2 * body * counts["slots"] + 2 * embedding * trained_tokens
    forward += 2 * 2 * config.hidden_size * config.num_hidden_layers * counts["attention_pairs_computed"] / 2
    return 3 * forward


def time_table(timing: list[dict]) -> str:
    lines = [
        "| model | max_length | layout | epoch s (median) | epoch CPU s | tokens/s | trained tokens/s "
        "| vs padded (CPU s) | FLOPs vs padded |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in timing:
        base = entry["layouts"]["padded"]["epoch_cpu_s"]
        base_flops = entry["layouts"]["padded"]["flops"]
        for name, t in entry["layouts"].items():
            lines.append(
                f"| {entry['model']} | {entry['max_length']} | {name} | {t['epoch_s']:.1f} | {t['epoch_cpu_s']:.1f} "
                f"| {entry['tokens'] / t['epoch_s']:.0f} | {entry['trained_tokens'] / t['epoch_s']:.0f} "
                f"| {base / t['epoch_cpu_s']:.2f}x | {t['flops'] / base_flops:.2f} |"
            )
    return "\n".join(lines)


def diagnosis_table(diagnosis: dict) -> str:
    lines = [
        "| batch | shape | mask | mask construction ms | backbone forward ms | mask share |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in ("padded", "dataset packed"):
        d = diagnosis[name]
        lines.append(
            f"| {name} | {d['shape']} | {d['mask']} | {d['mask_ms']:.2f} | {d['backbone_forward_ms']:.0f} "
            f"| {d['mask_ms'] / d['backbone_forward_ms']:.2%} |"
        )
    kernel = dict(diagnosis["sdpa_fwd_bwd_ms_per_layer"])
    shape = kernel.pop("shape")
    lines += [
        "",
        f"| sdpa forward + backward, one layer, q {shape} | ms | x {diagnosis['layers']} layers |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {ms:.1f} | {ms * diagnosis['layers'] / 1e3:.2f} s |" for name, ms in kernel.items()
    ]
    return "\n".join(lines)


def main() -> None:
    parser = command_line(__doc__, from_json=False)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (1: on a shared machine, idle OpenMP threads spin and inflate CPU time)",
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[384, 128])
    parser.add_argument("--tiny-rounds", type=int, default=3, help="whole epochs per layout (tiny model)")
    parser.add_argument("--smollm-steps", type=int, default=3, help="timed steps per layout (SmolLM2)")
    parser.add_argument("--skip-smollm", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    datasets.disable_progress_bars()
    load_before = loadavg()
    print(
        f"load average {load_before} ({os.cpu_count()} cores), torch {torch.__version__}, {options.threads} threads"
    )

    directory, gguf_file = smollm2_source()
    tokenizer = load_tokenizer(directory, gguf_file=gguf_file)
    pad_token_id = resolve_pad_token_id(tokenizer)
    raw = chat_rows()
    layouts, stats, counts = {}, {}, {}
    for max_length in options.lengths:
        layouts[max_length], prepared = layouts_for(tokenizer, raw, max_length)
        stats[max_length] = prepared["packed"].as_dict() | {"packing_fill": prepared["packed"].packing_fill}
        counts[max_length] = {name: layout_counts(batches) for name, batches in layouts[max_length].items()}
    print(rows_table(counts, stats), flush=True)

    timing = []

    def record(model_name: str, model: torch.nn.Module, max_length: int, method: str, result: dict) -> None:
        """A timing entry: each layout's epoch time with its FLOPs, and the epoch's (trained) tokens."""
        rows = [r for b in layouts[max_length]["padded"] for r in b]
        trained = sum(int(count_trained_tokens(torch.tensor(r["labels"]))) for r in rows)
        for name, times in result.items():
            times["flops"] = model_flops(model, counts[max_length][name], trained)
        tokens = sum(len(r["input_ids"]) for r in rows)
        entry = {"model": model_name, "max_length": max_length, "tokens": tokens, "trained_tokens": trained}
        timing.append(entry | {"method": method, "layouts": result})

    ids = {f"{n}_token_id": getattr(tokenizer, f"{n}_token_id") for n in ("bos", "eos", "pad")}
    tiny = build_tiny_llama(len(tokenizer), attn_implementation="sdpa", **ids)
    tiny_stepper = Stepper(tiny, pad_token_id)
    for max_length in options.lengths:
        result = time_whole_epochs(tiny_stepper, dict(layouts[max_length]), options.tiny_rounds)
        method = f"whole epochs, median of {options.tiny_rounds}"
        record("tiny Llama (h=64, 2 layers)", tiny, max_length, method, result)
        print(
            f"tiny, max_length {max_length}: " + ", ".join(f"{n} {t['runs_s']}" for n, t in result.items()),
            flush=True,
        )

    diagnosis = None
    if not options.skip_smollm:
        start = time.perf_counter()
        smollm = load_model(directory, gguf_file=gguf_file)
        smollm.config._attn_implementation = "sdpa"
        print(
            f"SmolLM2-135M loaded in {time.perf_counter() - start:.0f} s (load average {loadavg()})",
            flush=True,
        )
        smollm_stepper = Stepper(smollm, pad_token_id)
        max_length = options.lengths[0]
        chosen = {n: layouts[max_length][n] for n in ("padded", "padded, grouped", "dataset packed")}
        result = time_sampled_steps(smollm_stepper, chosen, options.smollm_steps)
        method = f"{options.smollm_steps} steps per layout spread over the epoch, median s/slot x slots"
        record("SmolLM2-135M (full, float32)", smollm, max_length, method, result)
        padded, packed = layouts[max_length]["padded"], layouts[max_length]["dataset packed"]
        widest = max(range(len(padded)), key=lambda i: max(len(r["input_ids"]) for r in padded[i]))
        diagnosis = diagnose(smollm, pad_token_id, padded[widest], packed[0], repeats=3)
        print(diagnosis_table(diagnosis), flush=True)

    print(time_table(timing))
    results = {
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "threads": options.threads,
            "torch": torch.__version__,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "micro_batch": BATCH,
        "rows": counts,
        "packing_stats": stats,
        "timing": timing,
        "diagnosis": diagnosis,
    }
    with open(RESULTS, "w") as file:
        json.dump(results, file, indent=1)
    print(f"load average after: {results['machine']['loadavg_after']}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
