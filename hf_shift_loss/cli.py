"""The ``hf-shift-loss`` command.

    hf-shift-loss inspect --tokenizer HuggingFaceTB/SmolLM2-135M-Instruct --data train.jsonl \\
        --max-length 2048 --html report.html --stats-json stats.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hf_shift_loss.data.chat import DEFAULT_END_OF_TURN, DEFAULT_TRAIN_ROLES, END_OF_TURN_MODES
from hf_shift_loss.data.encode import TRAIN_ON


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-shift-loss", description="Tools for the causal-LM fine-tuning loss of hf_shift_loss."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="show which tokens of a dataset are trained, with statistics and an HTML report",
        description="Encode a dataset exactly as training does (the Encoder); print examples with trained "
        "tokens highlighted and the dataset statistics (DataStats), and write an HTML report.",
    )
    inspect.add_argument(
        "--tokenizer", required=True, help="local directory, hub id, or path to a .gguf file"
    )
    inspect.add_argument(
        "--data",
        required=True,
        help=".jsonl / .json / .parquet / .csv file, a save_to_disk directory, or a datasets hub name",
    )
    inspect.add_argument(
        "--split", default="train", help="split of a hub dataset or a saved DatasetDict (default: train)"
    )
    inspect.add_argument(
        "--chat-template", help="Jinja chat template (or a file holding one) replacing the tokenizer's"
    )
    inspect.add_argument(
        "-n", "--num-examples", type=int, default=3, help="examples shown token by token (default: 3)"
    )
    inspect.add_argument("--limit", type=_positive_int, help="inspect only the first N examples")
    inspect.add_argument(
        "--max-length", type=_positive_int, help="truncate as training would (default: no limit)"
    )
    inspect.add_argument(
        "--train-roles",
        nargs="+",
        default=list(DEFAULT_TRAIN_ROLES),
        help="chat roles trained (default: assistant)",
    )
    inspect.add_argument(
        "--train-end-of-turn",
        choices=END_OF_TURN_MODES,
        default=DEFAULT_END_OF_TURN,
        help="end-of-turn tokens trained (default: turn)",
    )
    inspect.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        default="completion",
        help="completion: the completion / every turn of --train-roles; last_turn: only the last such "
        "turn; all: every token (default: completion)",
    )
    inspect.add_argument(
        "--html", default="inspect-report.html", help="HTML report path (default: %(default)s)"
    )
    inspect.add_argument("--no-html", action="store_true", help="do not write the HTML report")
    inspect.add_argument("--stats-json", help="also write the statistics as JSON to this path")
    inspect.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    from hf_shift_loss.data.load import load_data, load_tokenizer
    from hf_shift_loss.inspector import inspect_dataset

    tokenizer = load_tokenizer(args.tokenizer, chat_template=args.chat_template)
    examples = load_data(args.data, split=args.split, limit=args.limit)
    report = inspect_dataset(
        tokenizer,
        examples,
        num_examples=args.num_examples,
        html_path=None if args.no_html else args.html,
        show_progress=False if args.no_progress else None,
        max_length=args.max_length,
        train_on=args.train_on,
        train_roles=tuple(args.train_roles),
        train_end_of_turn=args.train_end_of_turn,
    )
    if args.stats_json:
        with open(args.stats_json, "w", encoding="utf-8") as file:
            json.dump(report.to_dict(), file, indent=2)
    # Nonzero when nothing could be encoded: a CI data check can rely on it.
    return 1 if report.failed_examples and not report.stats.examples else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-shift-loss`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return run_inspect(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
