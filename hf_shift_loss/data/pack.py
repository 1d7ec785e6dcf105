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

import bisect
import heapq
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
from hf_shift_loss.options import PACKING_OVERFLOWS, PackingOverflow, check_choice, check_max_length

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

# Attention backends whose masks come from masking_utils' mask functions, which honour packed
# position_ids (block-diagonal causal mask) when there is no attention_mask and no cache.
_MASK_BACKENDS = ("sdpa", "eager", "flex_attention")
# Backends that read packed position_ids into cu_seqlens for a varlen kernel; transformers only
# does so for a batch of one row (modeling_flash_attention_utils._is_packed_sequence, pinned by
# tests/test_pins.py).
_VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def _check_options(max_length: int, overflow: str) -> None:
    check_max_length(max_length)
    check_choice("packing_overflow", overflow, PACKING_OVERFLOWS)


def _bfd_rows(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing on an int array: ``(members, row_offsets)``, row ``r`` holding
    ``members[row_offsets[r]:row_offsets[r + 1]]`` in the order they were placed.

    Free rooms are bucketed by size (a min-heap of row indices per room, and the sorted list of the
    room sizes that have a row), so a placement is a bisection over at most ``capacity`` sizes: the
    row chosen is the one with the least free room >= the length, the lowest row index among equals.
    """
    if len(lengths) and int(lengths.max()) > capacity:
        index = int(np.argmax(lengths))  # the first of the longest: the first one placed
        raise ValueError(
            f"sequence {index} has {int(lengths[index])} tokens, more than the row capacity {capacity}"
        )
    order = np.argsort(-lengths, kind="stable")
    buckets: list[list[int]] = [[] for _ in range(capacity + 1)]  # free room -> heap of row indices
    rooms: list[int] = []  # the free rooms that have a row, sorted; full rows leave
    row_of: list[int] = []  # the row of each sequence, in placement order
    n_rows = 0
    for length in lengths[order].tolist():
        slot = bisect.bisect_left(rooms, length)
        if slot == len(rooms):
            row, room = n_rows, capacity
            n_rows += 1
        else:
            room = rooms[slot]
            row = heapq.heappop(buckets[room])
            if not buckets[room]:
                del rooms[slot]
        row_of.append(row)
        left = room - length
        if left > 0:
            if not buckets[left]:
                bisect.insort(rooms, left)
            heapq.heappush(buckets[left], row)
    rows = np.asarray(row_of, dtype=np.int64)
    placed = np.argsort(rows, kind="stable")  # grouped by row, placement order within a row
    row_offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=row_offsets[1:])
    return order[placed], row_offsets


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Group sequence indices into rows of at most ``capacity`` tokens, best-fit decreasing.

    Sequences are placed longest first (equal lengths in index order), each into the fullest row it
    still fits (the row with the least free room >= its length; the oldest row among equals), else a
    new row: O(n log capacity), and never more than 11/9 of the optimal number of rows (+ 1).

    Examples:
        >>> best_fit_decreasing([5, 3, 4, 2, 6], capacity=8)
        [[4, 3], [0, 1], [2]]
    """
    members, row_offsets = _bfd_rows(np.asarray(lengths, dtype=np.int64).reshape(-1), capacity)
    return [members[a:b].tolist() for a, b in zip(row_offsets[:-1], row_offsets[1:], strict=True)]


def split_points(labels: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """Where ``packing_overflow="split"`` cuts a sequence, and how many trained targets the cuts lose.

    The one split rule: the packer cuts with it and the inspector shows its cuts, so what is shown is
    what is trained. Pieces start every ``max_length`` tokens; a piece after the first loses its first
    target (the label at the cut was predicted from the token before it, now in another piece).

    Args:
        labels: the sequence's ``[T]`` labels (-100 where nothing is trained).
        max_length: the row capacity.

    Returns:
        ``(cuts, lost)``: the positions where the pieces after the first start (empty when
        ``T <= max_length``) and the number of those positions whose label is a target.

    Examples:
        >>> split_points([-100, 1, 2, 3, 4, 5, -100], max_length=3)
        ([3, 6], 1)
        >>> split_points([-100, 1, 2], max_length=3)
        ([], 0)
    """
    cuts = list(range(max_length, len(labels), max_length))
    return cuts, sum(1 for cut in cuts if labels[cut] != IGNORE_INDEX)


def split_pieces(
    lengths: np.ndarray, max_length: int, overflow: PackingOverflow
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pieces the packer lays out: ``(source, start, length)``, int64 arrays of shape ``[pieces]``.

    :func:`split_points`'s rule over a whole dataset's lengths at once (pieces every ``max_length``).

    ``"truncate"``: one piece per row, its first ``max_length`` tokens. ``"split"``: a row longer than
    ``max_length`` becomes ``ceil(length / max_length)`` consecutive pieces of ``max_length`` tokens (the
    last one shorter); a later piece's first target is lost (it was predicted from the previous token).

    Examples:
        >>> [piece.tolist() for piece in split_pieces(np.array([3, 7]), max_length=4, overflow="split")]
        [[0, 1, 1], [0, 0, 4], [3, 4, 3]]
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if overflow == "truncate":
        return (
            np.arange(len(lengths)),
            np.zeros(len(lengths), dtype=np.int64),
            np.minimum(lengths, max_length),
        )
    counts = np.maximum(1, -(-lengths // max_length))  # an empty row is one (empty) piece
    source = np.repeat(np.arange(len(lengths)), counts)
    start = (np.arange(len(source)) - np.repeat(np.cumsum(counts) - counts, counts)) * max_length
    return source, start, np.minimum(lengths[source] - start, max_length)


@dataclass
class PackingPlan:
    """Which piece of which encoded row goes where, decided on the lengths alone (int64 arrays).

    Packed row ``r`` is the pieces ``row_offsets[r]:row_offsets[r + 1]`` laid end to end; piece ``p`` is
    tokens ``start[p]:start[p] + length[p]`` of encoded row ``source[p]``.
    """

    source: np.ndarray  # [pieces]
    start: np.ndarray  # [pieces]
    length: np.ndarray  # [pieces]
    row_offsets: np.ndarray  # [rows + 1]
    split_examples: int

    @property
    def rows(self) -> int:
        return len(self.row_offsets) - 1


def plan_packing(
    lengths: Sequence[int] | np.ndarray, max_length: int, overflow: PackingOverflow = "truncate"
) -> PackingPlan:
    """Pieces (:func:`split_pieces`) grouped into rows of ``max_length`` by :func:`best_fit_decreasing`.

    Examples:
        >>> plan = plan_packing([3, 2, 4], max_length=5)
        >>> plan.source.tolist(), plan.row_offsets.tolist()
        ([2, 0, 1], [0, 1, 3])
    """
    _check_options(max_length, overflow)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    source, start, length = split_pieces(lengths, max_length, overflow)
    members, row_offsets = _bfd_rows(length, max_length)
    split_examples = int(np.sum(lengths > max_length)) if overflow == "split" else 0
    return PackingPlan(source[members], start[members], length[members], row_offsets, split_examples)


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


def check_packing_support(
    model: Any, position_ids: torch.Tensor | None = None, *, use_cache: bool | None = None
) -> None:
    """Raise ``ValueError`` saying why if ``model`` would not keep packed sequences apart.

    Packed batches carry ``position_ids`` and no ``attention_mask``. transformers 5 turns them into a
    block-diagonal causal mask (sdpa, eager, flex) or varlen flash-attention calls (pinned by
    tests/test_packing.py and tests/test_pins.py), but only

    - with no KV cache in the forward pass (``use_cache=False``), else the causal mask spans the whole
      row and sequences attend to each other silently;
    - for flash attention, with one row per batch (``per_device_train_batch_size=1``).

    Args:
        model: the causal LM, possibly wrapped (DDP, FSDP, peft).
        position_ids: the batch's ``[rows, T]`` position ids, to check the layout (optional).
        use_cache: the ``use_cache`` the model is called with; ``None`` means the config's default.
    """
    config = _find_config(model)
    backend = getattr(config, "_attn_implementation", None) or "eager"
    if use_cache is None:
        use_cache = bool(getattr(config, "use_cache", False))
    if use_cache:
        raise ValueError(
            "packed batches (position_ids, no attention_mask) need the model called with use_cache=False: "
            "transformers builds the packed (block-diagonal) attention mask only when no KV cache exists, "
            f"and {type(config).__name__}.use_cache is True, so packed sequences would attend to each other. "
            "Call the model with use_cache=False (or set model.config.use_cache = False)."
        )
    if backend in _MASK_BACKENDS:
        return
    if backend in _VARLEN_BACKENDS or "flash" in backend:
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] != 1:
            raise ValueError(
                f"attn_implementation={backend!r} only unpacks packed sequences in a batch of one row, got "
                f"{position_ids.shape[0]} rows; train with per_device_train_batch_size=1 (one packed row per batch)"
            )
        return
    raise ValueError(
        f"attn_implementation={backend!r} is not known to keep packed sequences apart (supported: "
        f"{', '.join(_MASK_BACKENDS + _VARLEN_BACKENDS)}); disable packing or load the model with "
        "attn_implementation='sdpa'"
    )


def _find_config(model: Any) -> Any:
    """The config of a model under DDP / FSDP (``.module``) or peft (``get_base_model``) wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        else:
            break
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"cannot check packing support: {type(model).__name__} has no config")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config
