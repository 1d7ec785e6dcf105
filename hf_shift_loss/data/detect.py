"""Which format a row, or a dataset, is: the fields that make each format, decided in one order.

:func:`detect_format` reads a dataset's columns; the Encoder reads each row's keys in the same order
(:data:`FORMAT_KEYS`), and ``prepare_dataset`` refuses a dataset whose rows mix formats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "FORMATS",
    "FORMAT_KEYS",
    "detect_format",
    "is_chat",
    "refuse_template_columns",
    "renders_on_its_own",
]

# The fields that make a row of each format, in the order a row's format is decided (a row with
# input_ids is pre-tokenized whatever else it has; Encoder.__call__ decides in the same order).
FORMAT_KEYS = {
    "tokenized": ("input_ids",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
FORMATS = tuple(FORMAT_KEYS)
_FORMAT_HELP = (
    "'text'; 'prompt' and 'completion' (strings, or lists of messages); 'messages'; or 'input_ids' "
    "(with optional 'labels')"
)


def detect_format(columns: Sequence[str]) -> str:
    """The dataset format from its column names (see the module docstring); ValueError if none fits.

    Examples:
        >>> detect_format(["prompt", "completion", "id"])
        'prompt_completion'
    """
    names = set(columns)
    for data_format, keys in FORMAT_KEYS.items():
        if names.issuperset(keys):
            return data_format
    raise ValueError(f"the dataset's columns {sorted(names)} fit no known format; expected {_FORMAT_HELP}")


def renders_on_its_own(row: Mapping[str, Any]) -> bool:
    """A chat row with its own ``tools``/``chat_template_kwargs`` or structured content: rendered alone."""
    if row.get("tools") or row.get("chat_template_kwargs"):
        return True
    messages = row.get("messages")
    if messages is None and isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        messages = row["prompt"] + row["completion"]
    return isinstance(messages, list) and any(
        isinstance(message, Mapping) and isinstance(message.get("content"), list | tuple)
        for message in messages
    )


def is_chat(example: Mapping[str, Any]) -> bool:
    return example.get("messages") is not None or isinstance(example.get("prompt"), list)


def refuse_template_columns(example: Mapping[str, Any], where: str) -> None:
    """``tools`` / ``chat_template_kwargs`` on a row that no chat template renders would be lost: refused."""
    for column in ("tools", "chat_template_kwargs"):
        if example.get(column):
            raise ValueError(
                f"{where}: has {column!r} but is not a conversation, so no chat template renders it; give the "
                "row as 'messages' (or a conversational prompt/completion), or drop the column"
            )
