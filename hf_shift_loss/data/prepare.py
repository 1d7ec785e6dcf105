"""Dataset to training rows, once: encode (``datasets.map``), drop the untrainable, count, pack.

:func:`prepare_dataset` is what :class:`hf_shift_loss.ShiftLossTrainer` runs on every dataset it is
given without a ``data_collator``. A map-style ``datasets.Dataset`` is encoded with ``num_proc``
workers and cached like any ``map``; its :class:`DataStats` are exact counts over the whole dataset,
computed in the preparing process (so they do not depend on data-loader workers or ranks). A
streamed ``datasets.IterableDataset`` is encoded and packed lazily, as rows are read; its counts are
not known in advance, and each dropped row is logged as it happens.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from hf_shift_loss.data.encode import FORMAT_KEYS, Encoder, detect_format
from hf_shift_loss.data.pack import pack_dataset, pack_rows
from hf_shift_loss.data.stats import COUNT_COLUMNS, DataStats
from hf_shift_loss.data.validate import CHECK_BATCH_ROWS, check_row_vocabulary, check_vocabulary
from hf_shift_loss.options import (
    ON_UNTRAINED,
    PACKING_OVERFLOWS,
    OnUntrained,
    PackingOverflow,
    check_choice,
    check_packing,
)

__all__ = ["PreparedDataset", "prepare_dataset"]

logger = logging.getLogger(__name__)

# How many streamed rows are packed together (a window of an IterableDataset).
STREAM_PACKING_WINDOW = 1000
# Rows encoded per batch: one tokenizer call each; what the encoding holds at once (ids, offsets).
ENCODE_BATCH_ROWS = 100


@dataclass
class PreparedDataset:
    """Rows ready for :class:`hf_shift_loss.data.batch.Batcher`, and what preparing them counted.

    ``stats`` is None for a streamed dataset (its rows are encoded as they are read).
    """

    dataset: datasets.Dataset | datasets.IterableDataset
    stats: DataStats | None
    format: str


def dataset_columns(dataset: datasets.Dataset | datasets.IterableDataset, name: str = "train") -> list[str]:
    """The column names of a dataset (read from its first row when a streamed one does not declare them)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # a streamed dataset whose features are unknown
    if first is None:
        raise _empty(name)
    return list(first.keys())


def _empty(name: str) -> ValueError:
    return ValueError(
        f"the {name} set is empty (0 rows), so there is nothing to "
        f"{'train on' if name == 'train' else 'evaluate'}; check the data file or the split and filters "
        "that made it, or leave the set out"
    )


def prepare_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    encoder: Encoder,
    *,
    packing: bool = False,
    packing_overflow: PackingOverflow = "truncate",
    on_untrained: OnUntrained = "drop",
    num_proc: int | None = None,
    name: str = "train",
    vocab_size: int | None = None,
    shuffle_seed: int | None = None,
) -> PreparedDataset:
    """Encode every row, drop (or refuse) rows with nothing to train, count, and optionally pack.

    Args:
        dataset: rows in one of the formats of :mod:`hf_shift_loss.data.encode`.
        encoder: turns one row into ``input_ids``/``labels`` and counts; its ``max_length`` is the row
            capacity when packing.
        packing: pack the encoded rows into rows of ``encoder.max_length`` (best-fit decreasing over
            the whole dataset), with restarting ``position_ids``.
        packing_overflow: with packing, a row longer than ``max_length`` is ``"truncate"``-d (by the
            encoder, as without packing) or ``"split"`` into pieces.
        on_untrained: a row with no trained token is ``"drop"``-ped (counted, and said once) or
            ``"raise"``-s a ValueError naming the row.
        num_proc: worker processes for ``datasets.map`` (map-style datasets).
        name: how the dataset is named in messages ("train", "eval").
        vocab_size: the model's embedding rows: an input id or label outside ``[0, vocab_size)`` is
            reported here, once, naming the row and position (not as a device-side assert mid-training).
        shuffle_seed: with packing, shuffle the encoded rows with this seed before packing them (TRL's
            ``shuffle_dataset``; it changes which rows of equal length share a packed row).

    Returns:
        :class:`PreparedDataset`: columns ``input_ids``, ``labels`` (and ``position_ids`` when packed).
    """
    check_choice("on_untrained", on_untrained, ON_UNTRAINED)
    max_length = encoder.max_length
    check_packing(packing, max_length)
    if packing:
        check_choice("packing_overflow", packing_overflow, PACKING_OVERFLOWS)
    streamed = isinstance(dataset, datasets.IterableDataset)
    if not streamed and len(dataset) == 0:
        raise _empty(name)
    columns = dataset_columns(dataset, name)
    data_format = detect_format(columns)
    if not streamed:
        data_format = _rows_format(dataset, name) or data_format
    if packing and packing_overflow == "split":
        # Long rows reach the packer whole; it splits them instead of the encoder cutting them.
        encoder = replace(encoder, max_length=None)
    map_options: dict[str, Any] = {}
    if not streamed:
        # datasets fingerprints a function by pickling it, which names the Encoder class but not its
        # code: with the code's own hash in the fingerprint, a changed encoder never reads a stale cache.
        fingerprint = Hasher.hash([dataset._fingerprint, Hasher.hash(encoder), _code_version()])
        map_options = {
            "num_proc": num_proc,
            "desc": f"Encoding the {name} set",
            "new_fingerprint": fingerprint,
        }
    # Whole batches: chat texts and strings are tokenized together by the fast tokenizer.
    encoded = dataset.map(
        _encode_batch,
        batched=True,
        batch_size=ENCODE_BATCH_ROWS,
        with_indices=True,
        remove_columns=columns,
        fn_kwargs={"encoder": encoder, "as_arrays": not streamed},
        **map_options,
    )

    stats = None if streamed else _count(encoded, name, on_untrained, vocab_size)
    if stats is not None and not stats.kept_examples:
        raise ValueError(
            f"the {name} set has no row left to train: all {stats.examples} rows were dropped because none has "
            f"a trained token after masking and truncation ({stats.truncated_examples} of them were truncated "
            f"to max_length={encoder.max_length}; train_on={encoder.train_on!r}, train_roles="
            f"{list(encoder.train_roles)}); raise max_length, check which part of the rows is trained "
            "(hf-shift-loss inspect shows it), or fix the data"
        )
    if streamed:
        encoded = encoded.filter(_StreamedRowFilter(name, on_untrained, vocab_size), with_indices=True)
    elif stats.untrained_examples:
        encoded = encoded.filter(_has_trained_tokens, input_columns="trained_tokens", batched=True)
    encoded = encoded.remove_columns(
        [column for column in COUNT_COLUMNS if column in dataset_columns(encoded)]
    )

    if packing:
        if shuffle_seed is not None:
            encoded = encoded.shuffle(seed=shuffle_seed)
        pack_options = {"max_length": max_length, "overflow": packing_overflow}
        if streamed:
            encoded = encoded.map(
                pack_rows, batched=True, batch_size=STREAM_PACKING_WINDOW, fn_kwargs=pack_options
            )
            encoded = encoded.remove_columns(["split_examples", "lost_boundary_targets"])
        else:
            packed = pack_dataset(
                encoded,
                max_length,
                packing_overflow,
                desc=f"Packing the {name} set",
                new_fingerprint=Hasher.hash([encoded._fingerprint, pack_options, _code_version()]),
            )
            encoded = packed.dataset
            stats.packed_rows = len(encoded)
            stats.packed_capacity = len(encoded) * max_length
            stats.split_examples = packed.split_examples
            stats.lost_boundary_targets = packed.lost_boundary_targets
            stats.trained_tokens -= stats.lost_boundary_targets
    return PreparedDataset(dataset=encoded, stats=stats, format=data_format)


def _encode_batch(
    batch: dict[str, list], indices: list[int], encoder: Encoder, as_arrays: bool
) -> dict[str, list]:
    """:meth:`Encoder.encode_batch`; ``as_arrays``: the token columns as int64 arrays, which a map-style
    dataset writes without inspecting every value (the values and the stored types are those of lists)."""
    encoded = encoder.encode_batch(batch, indices)
    for column in ("input_ids", "labels") if as_arrays else ():
        encoded[column] = [np.asarray(values, dtype=np.int64) for values in encoded[column]]
    return encoded


@functools.cache
def _code_version() -> str:
    """A hash of the data path's source code (the modules whose output the datasets cache keeps)."""
    digest = hashlib.sha256()
    for module in sorted(("encode", "chat", "content", "special", "pack", "stats", "prepare", "validate")):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{module}.py")
        with open(path, "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()


def _count(
    encoded: datasets.Dataset, name: str, on_untrained: OnUntrained, vocab_size: int | None
) -> DataStats:
    """Exact statistics of an encoded map-style dataset, in one pass over its rows.

    The counting rules are :meth:`DataStats.add_example`'s, the same the collator and the inspector use;
    the ids are checked against the embedding first (:func:`check_vocabulary`, in arrow batches); this
    pass names the rows it drops or warns about.
    """
    stats = DataStats()
    untrained_rows: list[int] = []
    blank_rows: list[int] = []
    if vocab_size is not None:
        check_vocabulary(encoded, vocab_size, name)
    for row, example in enumerate(encoded.select_columns([*COUNT_COLUMNS, "input_ids", "labels"])):
        stats.add_example(example)
        if example["trained_tokens"] == 0:
            untrained_rows.append(row)
        if example["blank_completion"]:
            blank_rows.append(row)
    if untrained_rows and on_untrained == "raise":
        raise ValueError(
            f"{name} set, row {untrained_rows[0]}: no trained token after masking and truncation "
            f"({len(untrained_rows)} such rows); raise max_length, shorten the prompt, fix the row, or set "
            "on_untrained='drop' to drop them (counted)"
        )
    if blank_rows:
        logger.warning(
            "%s set: %d rows have a completion of only whitespace (rows %s): they train little more than EOS",
            name,
            len(blank_rows),
            _rows_shown(blank_rows),
        )
    if untrained_rows:
        logger.warning(
            "%s set: dropped %d of %d rows with no trained token after masking and truncation (rows %s)",
            name,
            len(untrained_rows),
            len(encoded),
            _rows_shown(untrained_rows),
        )
    return stats


def _rows_format(dataset: datasets.Dataset, name: str) -> str | None:
    """The one format of a map-style dataset's rows; a ValueError naming the formats and rows if several.

    None when the columns fit one format only (nothing to decide row by row).

    A row's format is the first of :data:`FORMAT_KEYS` whose fields it sets (not None), as the Encoder
    reads it; rows that set none are left to the Encoder's error. Decided from the columns' null masks,
    in arrow batches.
    """
    formats = {fmt: keys for fmt, keys in FORMAT_KEYS.items() if set(keys) <= set(dataset.column_names)}
    if len(formats) < 2:
        return None
    columns = sorted({key for keys in formats.values() for key in keys})
    rows: dict[str, list[int]] = {fmt: [] for fmt in formats}
    first_row = 0
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=CHECK_BATCH_ROWS):
        valid = {column: np.asarray(pc.is_valid(batch.column(column))) for column in columns}
        undecided = np.ones(batch.num_rows, dtype=bool)
        for fmt, keys in formats.items():
            mine = np.logical_and.reduce([valid[key] for key in keys]) & undecided
            undecided &= ~mine
            rows[fmt].extend((first_row + np.flatnonzero(mine)).tolist())
        first_row += batch.num_rows
    present = [fmt for fmt in formats if rows[fmt]]
    if len(present) > 1:
        described = "; ".join(
            f"'{fmt}': {len(rows[fmt])} rows ({_rows_shown(rows[fmt], 5)})" for fmt in present
        )
        raise ValueError(
            f"the {name} set mixes formats, {described}; one dataset holds one format (one rule for what "
            "is trained and counted): convert the rows to one format first (a text row as "
            "{'prompt': '', 'completion': text} trains all of it), or train the formats as separate datasets"
        )
    return present[0] if present else None


def _rows_shown(rows: list[int], limit: int = 10) -> str:
    return ", ".join(map(str, rows[:limit])) + (", ..." if len(rows) > limit else "")


def _has_trained_tokens(trained_tokens: list[int]) -> list[bool]:
    return [count > 0 for count in trained_tokens]


class _StreamedRowFilter:
    """Check streamed rows' ids and drop those with no trained token, saying so for each."""

    def __init__(self, name: str, on_untrained: OnUntrained, vocab_size: int | None) -> None:
        self.name, self.on_untrained, self.vocab_size = name, on_untrained, vocab_size

    def __call__(self, row: dict[str, Any], index: int) -> bool:
        if self.vocab_size is not None:
            check_row_vocabulary(row, self.vocab_size, f"{self.name} set, row {index}")
        if row["trained_tokens"] > 0:
            return True
        message = f"{self.name} set, row {index}: no trained token after masking and truncation"
        if self.on_untrained == "raise":
            raise ValueError(f"{message}; fix the row or set on_untrained='drop'")
        logger.warning("%s: dropped", message)
        return False
