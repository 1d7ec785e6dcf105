"""Packing: several examples per row of ``max_length``, kept apart by ``position_ids``, no padding inside.

Padding a batch to its longest example spends compute on pad tokens. Packing lays examples end to end
in rows of capacity ``max_length`` (best-fit decreasing: longest first, each into the fullest row it
fits) and tells the model where each one starts with ``position_ids`` that restart at 0. transformers
5 detects that layout when ``attention_mask`` is absent (``masking_utils.find_packed_sequence_indices``)
and builds a block-diagonal causal mask (sdpa, eager, flex) or calls the varlen kernel (flash
attention, one row only), so no example attends to another.

The trainer packs at the dataset level with :func:`pack_dataset`, in memory that does not grow with the
dataset: the rows are decided on the lengths alone (one int per example, :func:`plan_packing`), then the
packed rows are written a batch at a time from the encoded Arrow table (``take`` on the plan's rows,
slices gathered with numpy on the Arrow buffers), never the whole dataset as Python objects, and cached
like any ``datasets.map``. Every step sees full rows whatever the batch size. A streamed
``IterableDataset`` is packed in windows of rows by :func:`pack_rows`, the same plan and the same writer.

Two rules keep the loss exact (docs/packing.md):

- the first token of every packed sequence gets label -100: after the shift, the last token of
  sequence A would otherwise be trained to predict the first token of sequence B (that label was never
  a target unpacked either, so nothing trainable is lost);
- no KV cache may be built in the forward pass: transformers skips packed-sequence detection when a
  cache exists, so packed rows are only block-diagonal with ``use_cache=False``.
  :func:`check_packing_support` refuses a model/call that would silently attend across sequences.

Examples longer than ``max_length`` are truncated by the encoder (``packing_overflow="truncate"``) or
split here into ``max_length`` pieces (``"split"``, :func:`split_pieces`); both are counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.fingerprint import Hasher, generate_random_fingerprint, get_temporary_cache_files_directory

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.data.pack_attention import check_packing_support
from hf_shift_loss.data.pack_plan import (
    PackingPlan,
    _check_options,
    best_fit_decreasing,
    plan_packing,
    split_pieces,
    split_points,
)
from hf_shift_loss.options import PackingOverflow

__all__ = [
    "PACKING_COLUMNS",
    "PackedDataset",
    "PackingPlan",
    "best_fit_decreasing",
    "check_packing_support",
    "pack_dataset",
    "pack_rows",
    "plan_packing",
    "split_pieces",
    "split_points",
]

# Columns of a packed row: the batch's three tensors and the counts packing adds.
PACKING_COLUMNS = ("input_ids", "labels", "position_ids", "split_examples", "lost_boundary_targets")
# The token columns of a packed row (PACKING_COLUMNS without the counts), all int64 lists.
_TOKEN_COLUMNS = PACKING_COLUMNS[:3]
# Per-token values that move with their tokens when present (floats, any finite value).
_CARRIED_COLUMNS = ("loss_weights",)
# Packed rows written per Arrow batch by pack_dataset, and encoded rows read per batch for their
# lengths: what bounds the memory of packing a dataset of any size (about 2M tokens at 2048).
PACK_WRITE_ROWS = 1000
LENGTH_READ_ROWS = 50_000


def _list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [rows + 1], values)`` of an Arrow list column, values indexed by the offsets."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.offsets.to_numpy(), array.values.to_numpy(zero_copy_only=False)


def _list_array(row_tokens: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(row_tokens) + 1, dtype=np.int32)
    np.cumsum(row_tokens, out=offsets[1:])
    values = values if values.dtype.kind == "f" else values.astype(np.int64, copy=False)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _packed_columns(
    rows: pa.Table, start: np.ndarray, length: np.ndarray, pieces_per_row: np.ndarray
) -> dict[str, pa.ListArray]:
    """The token columns of packed rows: ``rows`` holds each piece's encoded row (one per piece, in plan
    order), ``pieces_per_row`` how many consecutive pieces each packed row takes. ``loss_weights``, when
    ``rows`` has them, move with their tokens (a packed sequence's first weight is kept, never read)."""
    piece_begin = np.cumsum(length) - length  # where each piece starts in the packed tokens
    within = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(piece_begin, length)
    carried = [name for name in _CARRIED_COLUMNS if name in rows.column_names]
    columns = {}
    for name in ("input_ids", "labels", *carried):
        offsets, values = _list_parts(rows.column(name))
        gathered = values[np.repeat(offsets[:-1] + start, length) + within]
        columns[name] = gathered.astype(np.float64) if name in carried else gathered.astype(np.int64)
    # Nothing may be trained to predict a sequence's first token from the previous sequence.
    columns["labels"][piece_begin[length > 0]] = IGNORE_INDEX
    columns["position_ids"] = within
    row_tokens = np.bincount(
        np.repeat(np.arange(len(pieces_per_row)), pieces_per_row),
        weights=length,
        minlength=len(pieces_per_row),
    ).astype(np.int64)
    return {name: _list_array(row_tokens, columns[name]) for name in (*_TOKEN_COLUMNS, *carried)}


def _lost_boundary_targets(table_rows: Any, plan: PackingPlan) -> int:
    """Targets lost where rows were split: a later piece's first label that was not -100.

    ``table_rows(indices)`` returns the encoded rows at ``indices`` as an Arrow table; only split rows
    are read.
    """
    later = np.flatnonzero(plan.start > 0)
    if not len(later):
        return 0
    offsets, values = _list_parts(table_rows(plan.source[later]).column("labels"))
    return int(np.sum(values[offsets[:-1] + plan.start[later]] != IGNORE_INDEX))


def _check_aligned(table: pa.Table, first_row: int = 0) -> np.ndarray:
    """The rows' lengths; ValueError naming the first row whose labels and input_ids differ in length."""
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    label_lengths = pc.list_value_length(table.column("labels")).to_numpy(zero_copy_only=False)
    mismatched = np.flatnonzero(lengths != label_lengths)
    if len(mismatched):
        row = int(mismatched[0])
        raise ValueError(
            f"row {first_row + row}: 'labels' has {label_lengths[row]} entries but 'input_ids' has {lengths[row]}; "
            "labels must be aligned with input_ids"
        )
    return lengths.astype(np.int64)


def pack_rows(
    batch: Mapping[str, Sequence[Any]], max_length: int, overflow: PackingOverflow = "truncate"
) -> dict:
    """Pack a columnar batch of encoded rows (``input_ids``, ``labels``) into rows of ``max_length``.

    A streamed dataset's windows are packed with it (``IterableDataset.map(pack_rows, batched=True)``);
    a map-style dataset is packed as a whole by :func:`pack_dataset`, the same plan and writer.

    Args:
        batch: ``{"input_ids": [[...], ...], "labels": [[...], ...]}``, and optional ``loss_weights``
            (``[[...], ...]`` aligned with ``labels``), which move with their tokens (other columns are
            ignored).
        max_length: capacity of a row in tokens.
        overflow: a sequence longer than ``max_length`` is ``"truncate"``-d to its first ``max_length``
            tokens, or ``"split"`` into ``max_length`` pieces packed independently (a piece's first target
            is lost: counted in ``lost_boundary_targets``).

    Returns:
        Columns :data:`PACKING_COLUMNS` (and ``loss_weights`` when given); ``position_ids`` restart at 0
        at every sequence, every sequence's first label is -100 (its weight is kept, and never read). The
        split counts stand on the first row.

    Examples:
        >>> packed = pack_rows({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        ...                     "labels": [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9]]}, max_length=5)
        >>> packed["input_ids"], packed["position_ids"]
        ([[6, 7, 8, 9], [1, 2, 3, 4, 5]], [[0, 1, 2, 3], [0, 1, 2, 0, 1]])
        >>> packed["labels"]
        [[-100, -100, 8, 9], [-100, 2, 3, -100, 5]]

        ``loss_weights`` move with their tokens:

        >>> pack_rows({"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [-100, 5]],
        ...            "loss_weights": [[1.0, 1.0, 1.0], [0.5, 0.5]]}, max_length=5)["loss_weights"]
        [[1.0, 1.0, 1.0, 0.5, 0.5]]
    """
    _check_options(max_length, overflow)
    types = {"input_ids": pa.list_(pa.int64()), "labels": pa.list_(pa.int64())}
    types.update({name: pa.list_(pa.float64()) for name in _CARRIED_COLUMNS if name in batch})
    table = pa.table(
        {name: pa.array([_as_list(row) for row in batch[name]], type=kind) for name, kind in types.items()}
    )
    plan = plan_packing(_check_aligned(table), max_length, overflow)
    columns = _packed_columns(table.take(plan.source), plan.start, plan.length, np.diff(plan.row_offsets))
    packed: dict[str, list] = {name: column.to_pylist() for name, column in columns.items()}
    counts = {
        "split_examples": plan.split_examples,
        "lost_boundary_targets": _lost_boundary_targets(table.take, plan),
    }
    for name, total in counts.items():
        packed[name] = [total] + [0] * (plan.rows - 1) if plan.rows else []
    return packed


def _as_list(values: Any) -> Any:
    return values.tolist() if isinstance(values, (np.ndarray, torch.Tensor)) else values


@dataclass
class PackedDataset:
    """A packed map-style dataset (columns ``input_ids``, ``labels``, ``position_ids``) and its counts."""

    dataset: datasets.Dataset
    split_examples: int
    lost_boundary_targets: int


class _PackedRowWriter:
    """``Dataset.map`` function over the plan's rows (Arrow batches): gathers their pieces' tokens."""

    def __init__(self, encoded: datasets.Dataset, schema: pa.Schema) -> None:
        self.encoded, self.schema = encoded, schema

    def __call__(self, plan_rows: pa.Table) -> pa.Table:
        source = plan_rows.column("source")
        pieces_per_row = pc.list_value_length(source).to_numpy(zero_copy_only=False)
        flat = {
            name: pc.list_flatten(plan_rows.column(name)).to_numpy() for name in ("source", "start", "length")
        }
        rows = self.encoded[flat["source"].tolist()]
        return pa.table(_packed_columns(rows, flat["start"], flat["length"], pieces_per_row)).cast(
            self.schema
        )


def _cache_file(dataset: datasets.Dataset, fingerprint: str) -> str | None:
    """Where ``map`` would cache a transform of ``dataset``: next to its files (a temporary folder
    when caching is off), or None (in memory) for an in-memory dataset."""
    if not dataset.cache_files:
        return None
    if datasets.is_caching_enabled():
        return os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), f"cache-{fingerprint}.arrow")
    return os.path.join(get_temporary_cache_files_directory(), f"cache-{generate_random_fingerprint()}.arrow")


def pack_dataset(
    dataset: datasets.Dataset,
    max_length: int,
    overflow: PackingOverflow = "truncate",
    *,
    desc: str | None = None,
    new_fingerprint: str | None = None,
) -> PackedDataset:
    """Pack a map-style dataset of encoded rows into rows of ``max_length`` (best-fit decreasing, globally).

    Memory does not grow with the dataset: the lengths are read (one int per row) and planned
    (:func:`plan_packing`), then the packed rows are written ``PACK_WRITE_ROWS`` at a time from the
    Arrow table by a ``Dataset.map`` over the plan, cached next to ``dataset``'s files under
    ``new_fingerprint``. The rows are exactly :func:`pack_rows` on the whole dataset at once.

    Args:
        dataset: columns ``input_ids`` and ``labels`` (int lists of equal lengths), and ``loss_weights``
            (carried with their tokens) when present; others are ignored.
        max_length: capacity of a row in tokens.
        overflow: ``"truncate"`` or ``"split"``, as in :func:`pack_rows`.
        desc: the progress bar's text.
        new_fingerprint: the packed dataset's fingerprint (its cache key); by default derived from
            ``dataset``'s and the options.

    Returns:
        :class:`PackedDataset`: columns ``input_ids``, ``labels``, ``position_ids`` (``[rows][tokens]``
        int64) and the split counts of :func:`pack_rows`.

    Examples:
        >>> import datasets
        >>> rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        ...                                    "labels": [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9]]})
        >>> packed = pack_dataset(rows, max_length=5)
        >>> packed.dataset[:]["position_ids"]
        [[0, 1, 2, 3], [0, 1, 2, 0, 1]]
    """
    _check_options(max_length, overflow)
    carried = [name for name in _CARRIED_COLUMNS if name in dataset.column_names]
    encoded = dataset.select_columns(["input_ids", "labels", *carried]).with_format("arrow")
    lengths = np.concatenate(
        [np.zeros(0, dtype=np.int64)]
        + [
            _check_aligned(batch, i * LENGTH_READ_ROWS)
            for i, batch in enumerate(encoded.iter(LENGTH_READ_ROWS))
        ]
    )
    plan = plan_packing(lengths, max_length, overflow)
    lost = _lost_boundary_targets(lambda indices: encoded[indices.tolist()], plan)
    plan_table = pa.table(
        {
            name: pa.ListArray.from_arrays(
                pa.array(plan.row_offsets.astype(np.int32)), pa.array(values, pa.int64())
            )
            for name, values in (("source", plan.source), ("start", plan.start), ("length", plan.length))
        }
    )
    fingerprint = new_fingerprint or Hasher.hash([dataset._fingerprint, max_length, overflow, "pack_dataset"])
    # The token columns keep the encoded dataset's types (datasets stores input_ids as int32).
    features = datasets.Features(
        {
            "input_ids": dataset.features["input_ids"],
            "labels": dataset.features["labels"],
            "position_ids": datasets.List(datasets.Value("int64")),
            **{name: datasets.List(datasets.Value("float64")) for name in carried},
        }
    )
    packed = (
        datasets.Dataset(plan_table)
        .with_format("arrow")
        .map(
            _PackedRowWriter(encoded, features.arrow_schema),
            batched=True,
            batch_size=PACK_WRITE_ROWS,
            remove_columns=["source", "start", "length"],
            features=features,
            desc=desc,
            new_fingerprint=fingerprint,
            cache_file_name=_cache_file(dataset, fingerprint),
        )
        .with_format(None)
    )
    return PackedDataset(packed, plan.split_examples, lost)
