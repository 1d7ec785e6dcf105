"""Token values checked once, at preparation, with the row, the column and the position in the message.

Three checks, each in one place:

- :func:`token_id_list`: one pre-tokenized row's ``input_ids`` or ``labels`` as integers. Refused:
  bools, strings, nested lists, non-finite or fractional numbers, negative ids, and negative labels
  other than ``-100`` (``-1``, an "ignore" value elsewhere, would be trained here). Vectorized over
  the row (numpy); the Encoder calls it for every pre-tokenized row it encodes.
- :func:`loss_weight_list`: one row's ``loss_weights`` as floats. Refused: bools, strings, nested
  lists, NaN and infinities.
- :func:`check_vocabulary`: every encoded id and label inside the model's embedding, over a whole
  prepared dataset in arrow batches (no Python loop over rows or tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from hf_shift_loss.constants import IGNORE_INDEX

__all__ = ["check_vocabulary", "loss_weight_list", "token_id_list"]

# Rows per arrow batch of the vocabulary check.
CHECK_BATCH_ROWS = 10_000
TOKEN_COLUMNS = ("input_ids", "labels")


def token_id_list(values: Any, column: str, where: str) -> list[int]:
    """``values`` (a list, array or tensor of token ids) as a list of ints, or a ValueError naming the
    first bad value: ``"{where}, column '{column}', position {p}: ..."``.

    Examples:
        >>> token_id_list([1, 5.0, -100], "labels", "row 0")
        [1, 5, -100]
        >>> token_id_list([1, -1], "labels", "row 3")
        Traceback (most recent call last):
        ...
        ValueError: row 3, column 'labels', position 1: label -1 is negative; ...
    """
    where = f"{where}, column '{column}'"
    values, array = _flat_numbers(values, where, "token id")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            position = int(np.argmax(bad))
            raise ValueError(
                f"{where}, position {position}: {values[position]!r} is not a whole number; token ids are "
                "integers (a column cast to float? convert it with int() where the data is made)"
            )
        array = array.astype(np.int64)
    negative = (array < 0) & (array != IGNORE_INDEX) if column == "labels" else array < 0
    if negative.any():
        position = int(np.argmax(negative))
        raise ValueError(f"{where}, position {position}: {_negative(column, int(array[position]))}")
    return array.astype(np.int64).tolist()


def loss_weight_list(values: Any, where: str) -> list[float]:
    """``values`` (a list, array or tensor of per-token weights) as a list of floats, or a ValueError
    naming the first bad value: ``"{where}, column 'loss_weights', position {p}: ..."``.

    Examples:
        >>> loss_weight_list([1, 0.5, 2.0], "row 0")
        [1.0, 0.5, 2.0]
        >>> loss_weight_list([1.0, float("nan")], "row 2")
        Traceback (most recent call last):
        ...
        ValueError: row 2, column 'loss_weights', position 1: loss weight nan is not a finite number; ...
    """
    where = f"{where}, column 'loss_weights'"
    array = _flat_numbers(values, where, "weight")[1].astype(np.float64)
    infinite = ~np.isfinite(array)
    if infinite.any():
        position = int(np.argmax(infinite))
        raise ValueError(
            f"{where}, position {position}: loss weight {array[position]} is not a finite number; give "
            "untrained positions any finite weight (0 or 1: their label is -100)"
        )
    return array.tolist()


def check_vocabulary(dataset: datasets.Dataset, vocab_size: int, name: str) -> None:
    """Raise a ValueError naming the first id (``input_ids``) or label outside ``[0, vocab_size)``
    (labels: other than -100) of an encoded map-style dataset, checked in arrow batches.

    Args:
        dataset: encoded rows with list columns ``input_ids`` and ``labels``.
        vocab_size: the model's embedding rows.
        name: the dataset's name in the message ("train", "eval").
    """
    first_row = 0
    table = dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow")
    for batch in table.iter(batch_size=CHECK_BATCH_ROWS):
        for column in TOKEN_COLUMNS:
            chunked = batch.column(column)
            lists = pa.concat_arrays(chunked.chunks) if chunked.num_chunks != 1 else chunked.chunk(0)
            values = np.asarray(lists.flatten().to_numpy(zero_copy_only=False))
            outside = _outside(values, vocab_size, column)
            if outside.any():
                index = int(np.argmax(outside))
                parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False))
                row = int(parents[index])
                position = index - int(np.searchsorted(parents, row))
                raise vocabulary_error(
                    f"{name} set, row {first_row + row}", column, position, int(values[index]), vocab_size
                )
        first_row += batch.num_rows


def check_row_vocabulary(row: dict[str, Any], vocab_size: int, where: str) -> None:
    """:func:`check_vocabulary` for one encoded row (a streamed dataset's, checked as it is read)."""
    for column in TOKEN_COLUMNS:
        values = np.asarray(row[column], dtype=np.int64)
        outside = _outside(values, vocab_size, column)
        if outside.any():
            position = int(np.argmax(outside))
            raise vocabulary_error(where, column, position, int(values[position]), vocab_size)


def vocabulary_error(where: str, column: str, position: int, value: int, vocab_size: int) -> ValueError:
    if value < 0:
        return ValueError(f"{where}, column '{column}', position {position}: {_negative(column, value)}")
    kind = "input id" if column == "input_ids" else "label"
    return ValueError(
        f"{where}, position {position}: {kind} {value} is outside the model's embedding of {vocab_size} rows; "
        "the tokenizer does not match the model (after adding tokens, call "
        "model.resize_token_embeddings(len(tokenizer)))"
    )


def _outside(values: np.ndarray, vocab_size: int, column: str) -> np.ndarray:
    outside = (values < 0) | (values >= vocab_size)
    return outside & (values != IGNORE_INDEX) if column == "labels" else outside


def _negative(column: str, value: int) -> str:
    if column == "labels":
        return (
            f"label {value} is negative; only {IGNORE_INDEX} marks a position as not trained (a label of "
            f"{value} would be a target): map your ignore value to {IGNORE_INDEX}"
        )
    return f"input id {value} is negative; token ids are >= 0"


def _flat_numbers(values: Any, where: str, noun: str) -> tuple[Sequence[Any], np.ndarray]:
    """``(values, array)``: a row's values (a tensor as a list) and the same as a 1-D numeric numpy array,
    or a ValueError naming the first value that is not a ``noun`` ("token id", "weight")."""
    if torch.is_tensor(values):
        values = values.tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"{where}: expected a list of {noun}s, got {type(values).__name__}")
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nested lists
        array = None
    if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iuf"):
        raise _not_a_number_list(values, where, noun)
    return values, array


def _not_a_number_list(values: Sequence[Any], where: str, noun: str) -> ValueError:
    """The error for a row that is not a flat list of numbers (``noun``: "token id", "weight"): names its
    first bad value."""
    for position, value in enumerate(values):
        if isinstance(value, bool | np.bool_):
            problem = f"{value!r} is a bool, not a {noun}"
        elif isinstance(value, str | bytes):
            hint = " (tokenize the text, or use a 'text' column)" if noun == "token id" else ""
            problem = f"{value!r} is a string, not a {noun}{hint}"
        elif isinstance(value, Sequence | np.ndarray):
            problem = f"a nested list, not a {noun} (one row is one flat list)"
        elif not isinstance(value, int | float | np.integer | np.floating):
            problem = f"{value!r} ({type(value).__name__}) is not a {noun}"
        else:
            continue
        return ValueError(f"{where}, position {position}: {problem}")
    return ValueError(f"{where}: expected a flat list of {noun}s, got {values!r:.80}")
