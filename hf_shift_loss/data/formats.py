"""Conversions into the accepted data formats: a row (shared by the recipe and ``hf-shift-loss inspect``),
and a dataset given TRL's ``formatting_func`` or ``dataset_text_field`` (the trainer)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import datasets

from hf_shift_loss.data.prepare import dataset_columns

__all__ = ["apply_trl_dataset_options", "prompt_completion_to_messages"]


def prompt_completion_to_messages(row: Mapping[str, Any]) -> dict[str, Any]:
    """A string ``{"prompt", "completion"}`` row as a user/assistant conversation (other keys dropped).

    The chat template then renders it and chat masking trains the answer and its end-of-turn token.

    Examples:
        >>> prompt_completion_to_messages({"prompt": "2+2=", "completion": "4"})
        {'messages': [{'role': 'user', 'content': '2+2='}, {'role': 'assistant', 'content': '4'}]}
    """
    turns = (("user", row["prompt"]), ("assistant", row["completion"]))
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


class _Formatted:
    """``formatting_func`` applied to one row: a string becomes ``{"text"}``, a list of messages ``{"messages"}``."""

    def __init__(self, formatting_func: Callable[[dict[str, Any]], Any]) -> None:
        self.formatting_func = formatting_func

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        value = self.formatting_func(row)
        if isinstance(value, str):
            return {"text": value}
        if isinstance(value, list) and all(isinstance(message, Mapping) for message in value):
            return {"messages": value}
        raise ValueError(
            f"row {index}: formatting_func returned {type(value).__name__}; it must return the row's text (a str) "
            "or its conversation (a list of {'role', 'content'} messages)"
        )


def apply_trl_dataset_options(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    formatting_func: Callable[[dict[str, Any]], Any] | None = None,
    dataset_text_field: str = "text",
    completion_only: bool = False,
    name: str = "train",
) -> datasets.Dataset | datasets.IterableDataset:
    """A dataset in one of the accepted formats, from TRL's ``formatting_func`` and ``dataset_text_field``.

    ``formatting_func(row)`` returns a row's text (trained as a ``text`` row) or its messages (a
    ``messages`` row); the row's other columns are removed, so the format is what the function made.
    ``dataset_text_field`` names the column read as ``text`` (TRL: the text of language-modeling rows);
    it applies when the dataset has no ``messages``/``prompt``/``input_ids`` column, as in TRL.
    ``completion_only``: whether prompt/completion rows would train only the completion; a formatting
    function would then turn them into text rows trained in full, so it is refused (as TRL does).

    Examples:
        >>> data = datasets.Dataset.from_list([{"q": "2+2=", "a": "4"}])
        >>> apply_trl_dataset_options(data, formatting_func=lambda row: row["q"] + row["a"])[0]
        {'text': '2+2=4'}
        >>> apply_trl_dataset_options(datasets.Dataset.from_list([{"body": "hi"}]), dataset_text_field="body")[0]
        {'text': 'hi'}
    """
    columns = dataset_columns(dataset)
    if formatting_func is not None:
        if "input_ids" in columns:
            raise ValueError(
                f"the {name} set is already tokenized ('input_ids'), so formatting_func cannot apply to it; pass "
                "the raw rows, or drop formatting_func"
            )
        if completion_only and {"prompt", "completion"} <= set(columns):
            raise ValueError(
                f"formatting_func turns the {name} set's prompt/completion rows into text, every token trained, "
                "but only the completion would be trained: set completion_only_loss=False (or train_on='all') to "
                "train the formatted text, or drop formatting_func to train the completion"
            )
        options = {"desc": f"Formatting the {name} set"} if isinstance(dataset, datasets.Dataset) else {}
        return dataset.map(_Formatted(formatting_func), with_indices=True, remove_columns=columns, **options)
    if dataset_text_field == "text" or {"messages", "prompt", "input_ids"} & set(columns):
        return dataset
    if dataset_text_field not in columns:
        raise ValueError(
            f"dataset_text_field={dataset_text_field!r} is not a column of the {name} set (columns: {columns}); "
            "name the column that holds the text"
        )
    if "text" in columns:
        dataset = dataset.remove_columns("text")
    return dataset.rename_column(dataset_text_field, "text")
