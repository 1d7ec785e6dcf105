"""The YAML + command-line parser of recipes: dataclasses filled from ``--config PATH`` and ``--field value``.

Generic over dataclasses (``RecipeConfig``, ``ShiftLossArguments`` or a user's own); importable as
``hf_shift_loss.config.parse_config`` too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from transformers import HfArgumentParser

__all__ = ["parse_config"]


def parse_config(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, *, default_config: str | None = None
) -> tuple[Any, ...]:
    """Fill dataclasses from a YAML file (``--config PATH``) and ``--field value`` overrides.

    Precedence: command line > YAML file > dataclass defaults. ``default_config`` is the YAML file used
    when ``--config`` is absent. An unknown key, in the file or on the command line, exits with status 2
    and the closest valid names ("did you mean").

    Examples:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Job:
        ...     steps: int = 10
        >>> parse_config([Job], ["--steps", "3"])
        (Job(steps=3),)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(list(dataclass_types))
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
    config_path = default_config
    if "--config" in argv:
        position = argv.index("--config")
        config_path = argv[position + 1]
        del argv[position : position + 2]
    if config_path:
        with open(config_path, encoding="utf-8") as file:
            values = yaml.safe_load(file) or {}
        _refuse_unknown(values, known, f"{config_path}: unknown key")
        # A string default is parsed like a command-line value (argparse), so "2e-4" becomes a float.
        parser.set_defaults(**{key: _yaml_value(value) for key, value in values.items()})
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        names = [arg.lstrip("-").split("=")[0] for arg in remaining if arg.startswith("--")]
        _refuse_unknown(dict.fromkeys(names or remaining), known, "unknown command-line argument")
    return tuple(parsed)


def _yaml_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict) else value


def _refuse_unknown(values: dict[str, Any], known: set[str], what: str) -> None:
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=3)
            suggestion = f"; did you mean {', '.join(hint)}?" if hint else ""
            print(f"error: {what} {key!r}{suggestion}", file=sys.stderr)
            raise SystemExit(2)
