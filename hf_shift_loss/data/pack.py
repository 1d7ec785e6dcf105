"""Packing: several examples per row of ``max_length``, kept apart by ``position_ids``, no padding inside.

Padding a batch to its longest example spends compute on pad tokens. Packing lays examples end to end
in rows of capacity ``max_length`` (best-fit decreasing: longest first, each into the fullest row it
fits) and tells the model where each one starts with ``position_ids`` that restart at 0. transformers
5 detects that layout when ``attention_mask`` is absent (``masking_utils.find_packed_sequence_indices``)
and builds a block-diagonal causal mask (sdpa, eager, flex) or calls the varlen kernel (flash
attention, one row only), so no example attends to another.

The trainer packs at the dataset level: :func:`pack_rows` runs once over the whole encoded dataset
(``Dataset.map(batched=True, batch_size=None)``, cached like any map), so every step sees full rows
whatever the batch size. A streamed ``IterableDataset`` is packed the same way in windows of rows.

Two rules keep the loss exact (docs/packing.md):

- the first token of every packed sequence gets label -100: after the shift, the last token of
  sequence A would otherwise be trained to predict the first token of sequence B (that label was never
  a target unpacked either, so nothing trainable is lost);
- no KV cache may be built in the forward pass: transformers skips packed-sequence detection when a
  cache exists, so packed rows are only block-diagonal with ``use_cache=False``.
  :func:`check_packing_support` refuses a model/call that would silently attend across sequences.

Examples longer than ``max_length`` are truncated by the encoder (``packing_overflow="truncate"``) or
split here into ``max_length`` pieces (``"split"``); both are counted.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.options import PACKING_OVERFLOWS, PackingOverflow, check_choice, check_max_length

__all__ = ["PACKING_COLUMNS", "best_fit_decreasing", "check_packing_support", "pack_rows", "split_points"]

# Columns of a packed row: the batch's three tensors and the counts packing adds.
PACKING_COLUMNS = ("input_ids", "labels", "position_ids", "split_examples", "lost_boundary_targets")

# Attention backends whose masks come from masking_utils' mask functions, which honour packed
# position_ids (block-diagonal causal mask) when there is no attention_mask and no cache.
_MASK_BACKENDS = ("sdpa", "eager", "flex_attention")
# Backends that read packed position_ids into cu_seqlens for a varlen kernel; transformers only
# does so for a batch of one row (modeling_flash_attention_utils._is_packed_sequence, pinned by
# tests/test_pins.py).
_VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sequence indices into rows of at most ``capacity`` tokens, best-fit decreasing.

    Sequences are placed longest first, each into the fullest row it still fits (the row with the
    least free room >= its length, found by bisection over rows sorted by free room), else a new row:
    O(n log n), and never more than 11/9 of the optimal number of rows (+ 1).

    Examples:
        >>> best_fit_decreasing([5, 3, 4, 2, 6], capacity=8)
        [[4, 3], [0, 1], [2]]
    """
    rows: list[list[int]] = []
    free_rooms: list[tuple[int, int]] = []  # (free room, row index), sorted; full rows leave it
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sequence {index} has {length} tokens, more than the row capacity {capacity}")
        slot = bisect.bisect_left(free_rooms, (length, -1))
        if slot == len(free_rooms):
            row_index, room = len(rows), capacity
            rows.append([])
        else:
            room, row_index = free_rooms.pop(slot)
        rows[row_index].append(index)
        if room > length:
            bisect.insort(free_rooms, (room - length, row_index))
    return rows


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


def pack_rows(
    batch: Mapping[str, Sequence[Any]], max_length: int, overflow: PackingOverflow = "truncate"
) -> dict:
    """Pack a columnar batch of encoded rows (``input_ids``, ``labels``) into rows of ``max_length``.

    The function for ``Dataset.map(pack_rows, batched=True, batch_size=None, remove_columns=...)``: the
    whole dataset is one batch, so the rows are packed globally.

    Args:
        batch: ``{"input_ids": [[...], ...], "labels": [[...], ...]}`` (other columns are ignored).
        max_length: capacity of a row in tokens.
        overflow: a sequence longer than ``max_length`` is ``"truncate"``-d to its first ``max_length``
            tokens, or ``"split"`` into ``max_length`` pieces packed independently (a piece's first target
            is lost: counted in ``lost_boundary_targets``).

    Returns:
        Columns :data:`PACKING_COLUMNS`; ``position_ids`` restart at 0 at every sequence, every
        sequence's first label is -100. The split counts stand on the first row.

    Examples:
        >>> packed = pack_rows({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        ...                     "labels": [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9]]}, max_length=5)
        >>> packed["input_ids"], packed["position_ids"]
        ([[6, 7, 8, 9], [1, 2, 3, 4, 5]], [[0, 1, 2, 3], [0, 1, 2, 0, 1]])
        >>> packed["labels"]
        [[-100, -100, 8, 9], [-100, 2, 3, -100, 5]]
    """
    check_max_length(max_length)
    check_choice("packing_overflow", overflow, PACKING_OVERFLOWS)
    pieces: list[tuple[list[int], list[int]]] = []
    split_examples = lost_boundary_targets = 0
    for input_ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        input_ids, labels = list(input_ids), list(labels)
        if overflow == "truncate" or len(input_ids) <= max_length:
            pieces.append((input_ids[:max_length], labels[:max_length]))
            continue
        cuts, lost = split_points(labels, max_length)
        split_examples += 1
        lost_boundary_targets += lost
        pieces.extend((input_ids[s : s + max_length], labels[s : s + max_length]) for s in (0, *cuts))
    packed: dict[str, list] = {column: [] for column in PACKING_COLUMNS}
    for members in best_fit_decreasing([len(ids) for ids, _ in pieces], max_length):
        row_ids, row_labels, row_positions = [], [], []
        for member in members:
            input_ids, labels = pieces[member]
            row_ids += input_ids
            # Nothing may be trained to predict this sequence's first token from the previous one.
            row_labels += [IGNORE_INDEX, *labels[1:]]
            row_positions += range(len(input_ids))
        packed["input_ids"].append(row_ids)
        packed["labels"].append(row_labels)
        packed["position_ids"].append(row_positions)
        packed["split_examples"].append(0)
        packed["lost_boundary_targets"].append(0)
    if packed["input_ids"]:
        packed["split_examples"][0] = split_examples
        packed["lost_boundary_targets"][0] = lost_boundary_targets
    return packed


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
