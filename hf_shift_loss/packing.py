"""Padding-free packing: several examples per row, kept apart by ``position_ids``, no attention mask.

Padding a batch to its longest example spends compute on pad tokens. Packing puts several examples
into each row of capacity ``max_length`` (best-fit decreasing) and tells the model where each one
starts with ``position_ids`` that restart at 0. transformers 5 detects that layout when
``attention_mask`` is absent (``masking_utils.find_packed_sequence_indices``) and builds a
block-diagonal causal mask (sdpa, eager, flex) or calls the varlen kernel (flash attention, one row
only), so no example attends to another.

Two rules keep the loss exact (docs/packing.md):

- the first token of every packed sequence gets label ``ignore_index``: after the shift, the last
  token of sequence A would otherwise be trained to predict the first token of sequence B;
- no KV cache may be built in the forward pass: transformers 5.24 skips packed-sequence detection
  when a cache exists (``_preprocess_mask_arguments``), and Llama's config has ``use_cache=True``, so
  packed rows are only block-diagonal when the model is called with ``use_cache=False``.
  :func:`check_packing_support` refuses a model/call that would silently attend across sequences.

Examples longer than ``max_length`` are truncated (``"truncate"``) or split into ``max_length`` pieces
(``"split"``); both are counted in :class:`PackingStats`.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from hf_shift_loss.loss import IGNORE_INDEX

__all__ = [
    "PackedRow",
    "PackedRows",
    "PackingStats",
    "pack_examples",
    "collate_packed",
    "pack_batch",
    "check_packing_support",
]

Overflow = Literal["truncate", "split"]
Layout = Literal["rows", "flat"]

# Attention backends whose masks come from masking_utils' mask functions, which honour packed
# position_ids (block-diagonal causal mask) when there is no attention_mask and no cache.
_MASK_BACKENDS = ("sdpa", "eager", "flex_attention")
# Backends that read packed position_ids into cu_seqlens for a varlen kernel; transformers only
# does so for a batch of one row (modeling_flash_attention_utils._is_packed_sequence).
_VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


@dataclass
class PackingStats:
    """What packing did, cumulated over every call that was given this object."""

    examples: int = 0
    """Examples received."""
    sequences: int = 0
    """Sequences placed into rows (a split example counts once per piece)."""
    rows: int = 0
    """Rows produced."""
    tokens: int = 0
    """Tokens placed into rows."""
    capacity: int = 0
    """rows x max_length: what the same rows would hold if full."""
    truncated_examples: int = 0
    """Examples longer than max_length that were cut (``overflow="truncate"``)."""
    truncated_tokens: int = 0
    """Tokens removed by that cut."""
    split_examples: int = 0
    """Examples longer than max_length that were split into pieces (``overflow="split"``)."""
    split_pieces: int = 0
    """Pieces those examples became."""
    lost_boundary_targets: int = 0
    """Trained targets lost at split points (a piece's first token cannot be predicted from the
    previous piece, which is another packed sequence now)."""

    @property
    def fill(self) -> float:
        """Fraction of the rows' capacity that holds real tokens."""
        return self.tokens / self.capacity if self.capacity else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "fill": self.fill}


@dataclass
class PackedRow:
    """One row: sequences laid end to end, labels with each sequence's first label masked."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sequence_lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def position_ids(self) -> list[int]:
        """0, 1, ... restarting at every sequence: how the model finds the sequence boundaries."""
        return [position for length in self.sequence_lengths for position in range(length)]


@dataclass
class PackedRows:
    """The result of :func:`pack_examples`: rows of at most ``max_length`` tokens and what it took."""

    rows: list[PackedRow]
    max_length: int
    stats: PackingStats

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index: int) -> PackedRow:
        return self.rows[index]


def _fit_to_length(
    input_ids: list[int],
    labels: list[int],
    max_length: int,
    overflow: Overflow,
    ignore_index: int,
    stats: PackingStats,
) -> list[tuple[list[int], list[int]]]:
    """Cut or split one example so that every piece fits a row."""
    length = len(input_ids)
    if length <= max_length:
        return [(input_ids, labels)]
    if overflow == "truncate":
        # The tail goes: the collator already cut prompts from the left; this is the last resort.
        stats.truncated_examples += 1
        stats.truncated_tokens += length - max_length
        return [(input_ids[:max_length], labels[:max_length])]
    pieces = [
        (input_ids[start : start + max_length], labels[start : start + max_length])
        for start in range(0, length, max_length)
    ]
    stats.split_examples += 1
    stats.split_pieces += len(pieces)
    # Each later piece's first label was a target (predicted from the previous token) before the split.
    stats.lost_boundary_targets += sum(1 for _, piece_labels in pieces[1:] if piece_labels[0] != ignore_index)
    return pieces


def pack_examples(
    encoded: Sequence[Mapping[str, Any]],
    max_length: int,
    *,
    overflow: Overflow = "truncate",
    ignore_index: int = IGNORE_INDEX,
    stats: PackingStats | None = None,
) -> PackedRows:
    """Pack encoded examples into rows of at most ``max_length`` tokens, best-fit decreasing.

    Sequences are placed longest first, each into the fullest row it still fits (the row with the
    least free room >= its length, found by bisection over rows sorted by free room), else a new row.
    That is O(n log n) searches and never more than 11/9 of the optimal number of rows (+ 1).

    Args:
        encoded: examples with ``input_ids`` (list of ints) and optional ``labels`` aligned with them
            (``ignore_index`` where not trained; without labels every token is trained), e.g. the output
            of ``PromptMaskingCollator.encode``.
        max_length: capacity of a row in tokens.
        overflow: what to do with an example longer than ``max_length``: ``"truncate"`` keeps its first
            ``max_length`` tokens, ``"split"`` cuts it into ``max_length`` pieces packed independently.
        ignore_index: label of untrained positions.
        stats: counts are added to this object (a fresh one by default), so a caller can cumulate them.

    Returns:
        :class:`PackedRows`; in every row, each sequence's first label is ``ignore_index``.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one input and one target), got {max_length}")
    if overflow not in ("truncate", "split"):
        raise ValueError(f"overflow must be 'truncate' or 'split', got {overflow!r}")
    stats = PackingStats() if stats is None else stats

    sequences: list[tuple[list[int], list[int]]] = []
    for index, example in enumerate(encoded):
        input_ids, labels = read_ids_and_labels(example, f"example {index}")
        if not input_ids:
            raise ValueError(f"example {index}: empty input_ids")
        stats.examples += 1
        for piece_ids, piece_labels in _fit_to_length(
            input_ids, labels, max_length, overflow, ignore_index, stats
        ):
            # Nothing may be trained to predict this sequence's first token from the previous one.
            sequences.append((piece_ids, [ignore_index, *piece_labels[1:]]))

    rows: list[PackedRow] = []
    # (free room, row index), sorted; full rows are dropped from it.
    free_rooms: list[tuple[int, int]] = []
    for input_ids, labels in sorted(sequences, key=lambda sequence: -len(sequence[0])):
        length = len(input_ids)
        slot = bisect.bisect_left(free_rooms, (length, -1))
        if slot == len(free_rooms):
            row_index, room = len(rows), max_length
            rows.append(PackedRow())
        else:
            room, row_index = free_rooms.pop(slot)
        row = rows[row_index]
        row.input_ids.extend(input_ids)
        row.labels.extend(labels)
        row.sequence_lengths.append(length)
        if room - length > 0:
            bisect.insort(free_rooms, (room - length, row_index))

    stats.sequences += len(sequences)
    stats.rows += len(rows)
    stats.tokens += sum(len(row) for row in rows)
    stats.capacity += len(rows) * max_length
    return PackedRows(rows=rows, max_length=max_length, stats=stats)


def collate_packed(
    rows: Sequence[PackedRow] | PackedRows,
    pad_token_id: int,
    *,
    layout: Layout = "rows",
    ignore_index: int = IGNORE_INDEX,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors for a packed batch: ``input_ids``, ``position_ids``, ``labels``; no ``attention_mask``.

    Args:
        rows: packed rows (from :func:`pack_examples`).
        pad_token_id: id written into padding (which is never attended to by a real token, and never
            trained).
        layout: ``"rows"``: ``[rows, T]`` with ``T`` the longest row, each row right-padded by a block
            of its own (positions restarting at 0); attention costs ``rows x T^2`` (sdpa, eager, flex).
            ``"flat"``: every row concatenated into ``[1, total]``, no padding; what flash attention's
            varlen path needs (it only unpacks a batch of one row). With sdpa/eager the mask is then
            ``total^2``, so prefer ``"rows"`` there.
        pad_to_multiple_of: round the sequence length up (to a multiple of 8/64 for tensor cores).

    Returns:
        ``input_ids``, ``position_ids``, ``labels``: int64 ``[rows, T]`` (or ``[1, total]``).
    """
    if layout not in ("rows", "flat"):
        raise ValueError(f"layout must be 'rows' or 'flat', got {layout!r}")
    rows = list(rows)
    if not rows:
        raise ValueError("collate_packed received no rows")
    if layout == "flat":
        rows = [
            PackedRow(
                input_ids=[token for row in rows for token in row.input_ids],
                labels=[label for row in rows for label in row.labels],
                sequence_lengths=[length for row in rows for length in row.sequence_lengths],
            )
        ]
    width = max(len(row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), ignore_index, dtype=torch.long)
    # Padding is a block of its own (positions from 0), so it is never part of a real sequence.
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for index, row in enumerate(rows):
        length = len(row)
        input_ids[index, :length] = torch.as_tensor(row.input_ids, dtype=torch.long)
        labels[index, :length] = torch.as_tensor(row.labels, dtype=torch.long)
        position_ids[index, :length] = torch.as_tensor(row.position_ids, dtype=torch.long)
        position_ids[index, length:] = torch.arange(width - length, dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def pack_batch(
    encoded_batch: Sequence[Mapping[str, Any]],
    max_length: int,
    pad_token_id: int,
    *,
    overflow: Overflow = "truncate",
    layout: Layout = "rows",
    ignore_index: int = IGNORE_INDEX,
    pad_to_multiple_of: int | None = None,
    stats: PackingStats | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`pack_examples` then :func:`collate_packed`: what ``PromptMaskingCollator(packing=True)`` calls.

    Returns ``input_ids``/``position_ids``/``labels`` ``[rows, T]`` (``[1, total]`` for ``"flat"``).
    """
    packed = pack_examples(
        encoded_batch, max_length, overflow=overflow, ignore_index=ignore_index, stats=stats
    )
    return collate_packed(
        packed, pad_token_id, layout=layout, ignore_index=ignore_index, pad_to_multiple_of=pad_to_multiple_of
    )


def check_packing_support(
    model: Any, position_ids: torch.Tensor | None = None, *, use_cache: bool | None = None
) -> None:
    """Raise ``ValueError`` saying why if ``model`` would not keep packed sequences apart.

    Packed batches carry ``position_ids`` and no ``attention_mask``. transformers 5 turns them into a
    block-diagonal causal mask (sdpa, eager, flex) or varlen flash-attention calls, but only

    - with no KV cache in the forward pass (``use_cache=False``), else the causal mask spans the whole
      row and sequences attend to each other silently;
    - for flash attention, with one row (``[1, total]``, ``collate_packed(layout="flat")``).

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
                f"{position_ids.shape[0]} rows; use collate_packed(..., layout='flat') (one [1, total] row)"
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


def read_ids_and_labels(example: Mapping[str, Any], where: str) -> tuple[list[int], list[int]]:
    """``input_ids`` and ``labels`` of a pre-tokenized example as int lists (lists or tensors accepted).

    Without ``labels`` every token is trained (labels = input_ids). Raises ``ValueError`` naming
    ``where`` when the two are not aligned.
    """
    input_ids = [int(token) for token in _as_list(example["input_ids"])]
    labels = example.get("labels")
    labels = list(input_ids) if labels is None else [int(label) for label in _as_list(labels)]
    if len(labels) != len(input_ids):
        raise ValueError(
            f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(input_ids)}; labels "
            "must be aligned with input_ids (the loss shifts them, do not pre-shift)"
        )
    return input_ids, labels


def _as_list(values: Any) -> list:
    if torch.is_tensor(values):
        return values.tolist()
    return list(values)
