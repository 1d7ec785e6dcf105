"""The ``hf-shift-loss`` command.

    hf-shift-loss inspect --tokenizer HuggingFaceTB/SmolLM2-135M-Instruct --data train.jsonl \\
        --max-length 2048 --html report.html --stats-json stats.json
    hf-shift-loss inspect --config recipes/configs/default.yaml     # exactly what that recipe trains

With ``--config``, the package reads the YAML as ``recipes/sft.py`` does, with the same functions
(:mod:`hf_shift_loss.recipe`): ``parse_config`` over ``RecipeConfig`` and ``ShiftLossArguments``, the
tokenizer of ``model_source``, the training rows of ``load_splits`` (the data file, prompt/completion
turned into messages with ``use_chat_template``, the held-out rows left out) and the
``ShiftLossArguments`` data options. No script is imported or run: a config from someone else's
checkout is data. ``--recipe PATH`` names a recipe script of your own whose functions of the same names
do the reading instead; that is the only way this command runs a script, and only the one named.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from hf_shift_loss.data.chat import DEFAULT_END_OF_TURN, DEFAULT_TRAIN_ROLES
from hf_shift_loss.options import END_OF_TURN_MODES, TRAIN_ON


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
        "--config",
        help="a recipe's YAML (recipes/configs/*.yaml): inspect what that recipe trains, with its tokenizer, "
        "training rows and options (then --tokenizer, --data and the encoding options are not taken)",
    )
    inspect.add_argument(
        "--recipe",
        help="a recipe script of your own that reads --config (its parse_config, RecipeConfig, "
        "ShiftLossArguments, model_source, load_tokenizer and load_splits): it is imported and run. "
        "Default: none, the package reads the config as recipes/sft.py does",
    )
    inspect.add_argument("--tokenizer", help="local directory, hub id, or path to a .gguf file")
    inspect.add_argument(
        "--data",
        help=".jsonl / .json / .parquet / .csv file, a save_to_disk directory, or a datasets hub name",
    )
    inspect.add_argument("--split", help="split of a hub dataset or a saved DatasetDict (default: train)")
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
        "--train-roles", nargs="+", help=f"chat roles trained (default: {' '.join(DEFAULT_TRAIN_ROLES)})"
    )
    inspect.add_argument(
        "--train-end-of-turn",
        choices=END_OF_TURN_MODES,
        help=f"end-of-turn tokens trained (default: {DEFAULT_END_OF_TURN})",
    )
    inspect.add_argument(
        "--train-on",
        choices=TRAIN_ON,
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


# Options that --config takes from the recipe; giving one as well would inspect something else.
_RECIPE_OWNED = (
    "tokenizer",
    "data",
    "split",
    "chat_template",
    "max_length",
    "train_roles",
    "train_end_of_turn",
    "train_on",
)


PACKAGE_RECIPE = "hf_shift_loss.recipe (as recipes/sft.py reads it; no script run)"


def _package_recipe(config: str) -> SimpleNamespace:
    """The package's reading of a recipe config, under the names a ``--recipe`` script has."""
    from hf_shift_loss import recipe
    from hf_shift_loss.config import ShiftLossArguments, parse_config
    from hf_shift_loss.data.load import load_tokenizer

    return SimpleNamespace(
        parse_config=parse_config,
        RecipeConfig=recipe.RecipeConfig,
        ShiftLossArguments=ShiftLossArguments,
        model_source=recipe.model_source,
        load_tokenizer=load_tokenizer,
        load_splits=functools.partial(recipe.load_splits, root=recipe.config_root(config)),
    )


def _import_recipe(recipe_path: str) -> Any:
    """The recipe script named by ``--recipe``, imported as a module (this runs it).

    Its folder is appended to ``sys.path`` (the recipe imports its helpers, ``sft_models.py``, from
    there), after the installed packages, so that a file there never shadows one of them.
    """
    if not os.path.isfile(recipe_path):
        raise SystemExit(f"hf-shift-loss inspect: error: --recipe {recipe_path}: no such file")
    recipe_dir = os.path.dirname(os.path.abspath(recipe_path))
    if recipe_dir not in sys.path:
        sys.path.append(recipe_dir)
    name = os.path.splitext(os.path.basename(recipe_path))[0]
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "")) == os.path.abspath(
        recipe_path
    ):
        return loaded  # already imported (as the tests do)
    spec = importlib.util.spec_from_file_location(name, recipe_path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _shown_path(path: str) -> str:
    """A path under the current directory relative to it (shorter, and the same on every machine)."""
    if not os.path.isabs(path):
        return path
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def recipe_inputs(
    config: str, recipe_path: str | None = None
) -> tuple[Any, Any, dict[str, Any], dict[str, str]]:
    """``(tokenizer, training rows, encoding options, about)`` of the recipe run by ``config``.

    By default the package's own reading (:mod:`hf_shift_loss.recipe`, what ``recipes/sft.py`` calls):
    ``parse_config`` with ``RecipeConfig`` and ``ShiftLossArguments``, ``model_source`` +
    ``load_tokenizer`` and ``load_splits`` (train rows only: the held-out rows are not trained), a
    relative ``data_path`` found from the current directory, then from the config's repository
    (:func:`~hf_shift_loss.recipe.config_root`). Nothing is imported from beside the config.
    ``recipe_path``: a script of the user's, imported (run), whose functions of the same names are used.

    Examples:
        >>> tokenizer, rows, options, about = recipe_inputs("recipes/configs/tiny.yaml")  # doctest: +SKIP
        >>> about["recipe"], options["max_length"]  # doctest: +SKIP
        ('hf_shift_loss.recipe (as recipes/sft.py reads it; no script run)', 256)
    """
    reader = _package_recipe(config) if recipe_path is None else _import_recipe(recipe_path)
    recipe, args = reader.parse_config(
        [reader.RecipeConfig, reader.ShiftLossArguments], ["--config", config], default_config=None
    )
    source, gguf_file = reader.model_source(recipe)
    tokenizer = reader.load_tokenizer(source, gguf_file=gguf_file)
    train_rows, held_out, data_source = reader.load_splits(recipe)
    from hf_shift_loss.data.encode import detect_format
    from hf_shift_loss.data.prepare import dataset_columns

    # TRL's completion_only_loss/assistant_only_loss are read for the data's format, as training does.
    data_format = detect_format(dataset_columns(train_rows))
    options = {
        **args.encoder_options(data_format),
        "packing": args.packing,
        "packing_overflow": args.packing_overflow,
    }
    rows = f"{len(train_rows)} training rows (the last {len(held_out)} held out"
    rows += f", the first {recipe.max_train_rows} kept)" if recipe.max_train_rows is not None else ")"
    about = {
        "config": config,
        "recipe": PACKAGE_RECIPE if recipe_path is None else _shown_path(reader.__file__),
        "data": f"{_shown_path(data_source)}: {rows}",
        "tokenizer": f"{_shown_path(source)} [{gguf_file}]" if gguf_file else _shown_path(source),
        "use_chat_template": "true (prompt/completion rows as user/assistant messages)"
        if recipe.use_chat_template
        else "false",
    }
    return tokenizer, train_rows, options, about


def run_inspect(args: argparse.Namespace) -> int:
    from hf_shift_loss.data.load import load_data, load_tokenizer
    from hf_shift_loss.inspector import inspect_dataset

    if args.config:
        given = [f"--{name.replace('_', '-')}" for name in _RECIPE_OWNED if getattr(args, name) is not None]
        if given:
            print(
                f"hf-shift-loss inspect: error: --config takes the tokenizer, data and options from the recipe; "
                f"{', '.join(given)} cannot be given with it (edit a copy of the YAML instead)",
                file=sys.stderr,
            )
            return 2
        tokenizer, examples, options, about = recipe_inputs(args.config, args.recipe)
        if args.limit is not None:
            examples = examples.select(range(min(args.limit, len(examples))))
    else:
        if args.tokenizer is None or args.data is None:
            print("hf-shift-loss inspect: error: give --tokenizer and --data, or --config", file=sys.stderr)
            return 2
        tokenizer = load_tokenizer(args.tokenizer, chat_template=args.chat_template)
        examples = load_data(args.data, split=args.split or "train", limit=args.limit)
        options = {
            "max_length": args.max_length,
            "train_on": args.train_on or "completion",
            "train_roles": tuple(args.train_roles or DEFAULT_TRAIN_ROLES),
            "train_end_of_turn": args.train_end_of_turn or DEFAULT_END_OF_TURN,
        }
        about = {
            "data": args.data + (f" (split {args.split})" if args.split else ""),
            "tokenizer": args.tokenizer,
        }
        if args.chat_template:
            about["chat template"] = (
                args.chat_template if os.path.isfile(args.chat_template) else "given inline"
            )
    if args.limit is not None:
        about["data"] += f"; the first {len(examples)} inspected (--limit)"
    report = inspect_dataset(
        tokenizer,
        examples,
        num_examples=args.num_examples,
        html_path=None if args.no_html else args.html,
        show_progress=False if args.no_progress else None,
        about=about,
        **options,
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
