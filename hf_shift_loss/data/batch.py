"""Tokens to batches: right-pad encoded rows into ``[batch, seq]`` tensors, or lay them end to end.

:class:`Batcher` is the trainer's data collator once a dataset is prepared. Four fields, as a
transformers model takes them: ``input_ids``, ``labels`` (padded with -100), and ``attention_mask``
for padded rows or ``position_ids`` for packed rows (positions restart at every packed sequence; no
attention mask, so transformers builds the block-diagonal causal mask). Rows with ``loss_weights`` add a
fifth, float32 ``loss_weights`` aligned with ``labels`` (0 where padded: untrained either way). Other
columns are ignored.

Padding-free (``padding_free=True``): the micro-batch's rows are laid end to end in one row
``[1, total tokens]`` with restarting ``position_ids``, as packing does within a row: no pad token is
computed, and each row keeps its own positions and attention (docs/packing.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_shift_loss.constants import IGNORE_INDEX

__all__ = ["Batcher", "resolve_pad_token_id"]

logger = logging.getLogger(__name__)


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (said once); ValueError naming the fix if neither exists.

    Padded positions are masked by ``attention_mask`` and labelled -100, so padding with EOS never
    trains on padding and never hides the trained EOS.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        logger.info("the tokenizer has no pad token; padding with its EOS token %r", tokenizer.eos_token)
        return int(tokenizer.eos_token_id)
    raise ValueError(
        f"{type(tokenizer).__name__} has neither a pad token nor an EOS token, so batches cannot be padded; "
        "set one, e.g. tokenizer.pad_token = tokenizer.unk_token, or tokenizer.add_special_tokens("
        "{'pad_token': '<pad>'}) and resize the model's embeddings"
    )


@dataclass
class Batcher:
    """Callable ``list[row] -> dict[str, Tensor]``: pads rows of ``input_ids``/``labels`` on the right.

    Args:
        pad_token_id: written into padding (never attended to, never trained).
        pad_to_multiple_of: round the sequence length up to a multiple of this (8 or 64 for tensor cores).
        padding_free: lay the rows end to end in one row with restarting ``position_ids`` (no
            ``attention_mask``). The first label of every row becomes -100: after the shift it would be
            the target of the previous row's last token, and it was never a target within its own row, so
            the trained tokens are exactly those of the padded batch.

    Examples:
        >>> batch = Batcher(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        ...                                  {"input_ids": [5, 8], "labels": [-100, 8]}])
        >>> batch["input_ids"]
        tensor([[5, 6, 7],
                [5, 8, 0]])
        >>> batch["attention_mask"]
        tensor([[1, 1, 1],
                [1, 1, 0]])
        >>> batch["labels"]
        tensor([[-100,    6,    7],
                [-100,    8, -100]])

        The same rows, padding-free:

        >>> batch = Batcher(pad_token_id=0, padding_free=True)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        ...                                                    {"input_ids": [5, 8], "labels": [3, 8]}])
        >>> batch["input_ids"]
        tensor([[5, 6, 7, 5, 8]])
        >>> batch["position_ids"]
        tensor([[0, 1, 2, 0, 1]])
        >>> batch["labels"]
        tensor([[-100,    6,    7, -100,    8]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free: bool = False

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {self.pad_to_multiple_of}")

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("the batcher received an empty list of rows")
        weighted = _has_loss_weights(rows)
        if self.padding_free:
            return self._end_to_end(rows, weighted)
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in rows[0]
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        # Packed: padding is a block of its own (positions from 0), never part of a real sequence.
        layout = torch.arange(width).repeat(len(rows), 1) if packed else torch.zeros_like(input_ids)
        weights = torch.zeros((len(rows), width), dtype=torch.float32) if weighted else None
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, :length] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[index, :length] = torch.as_tensor(row["labels"], dtype=torch.long)
            if weights is not None:
                weights[index, :length] = torch.as_tensor(row["loss_weights"], dtype=torch.float32)
            if packed:
                layout[index, :length] = torch.as_tensor(row["position_ids"], dtype=torch.long)
                layout[index, length:] = torch.arange(width - length)
            else:
                layout[index, :length] = 1
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids" if packed else "attention_mask": layout,
        }
        if weights is not None:
            batch["loss_weights"] = weights
        return batch

    def _end_to_end(self, rows: Sequence[Mapping[str, Any]], weighted: bool) -> dict[str, torch.Tensor]:
        """One row ``[1, total]``: the rows one after another, positions restarting at each (packed rows
        keep their own restarts); with ``pad_to_multiple_of``, a padding block of its own at the end."""
        input_ids = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
        labels = [torch.as_tensor(row["labels"], dtype=torch.long).clone() for row in rows]
        positions = [
            torch.as_tensor(row["position_ids"], dtype=torch.long)
            if "position_ids" in row
            else torch.arange(len(row["input_ids"]))
            for row in rows
        ]
        weights = (
            [torch.as_tensor(row["loss_weights"], dtype=torch.float32) for row in rows] if weighted else None
        )
        for row_labels in labels:
            row_labels[:1] = IGNORE_INDEX  # would be the target of the previous row's last token
        total = sum(len(ids) for ids in input_ids)
        if self.pad_to_multiple_of:
            padding = math.ceil(total / self.pad_to_multiple_of) * self.pad_to_multiple_of - total
            if padding:
                input_ids.append(torch.full((padding,), self.pad_token_id, dtype=torch.long))
                labels.append(torch.full((padding,), IGNORE_INDEX, dtype=torch.long))
                positions.append(torch.arange(padding))
                if weights is not None:
                    weights.append(torch.zeros(padding, dtype=torch.float32))
        batch = {
            "input_ids": torch.cat(input_ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
        }
        if weights is not None:
            batch["loss_weights"] = torch.cat(weights)[None]
        return batch


def _has_loss_weights(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the rows carry ``loss_weights``: all of them or none (ValueError naming the first odd row)."""
    weighted = [row.get("loss_weights") is not None for row in rows]
    if any(weighted) and not all(weighted):
        odd = weighted.index(not weighted[0])
        raise ValueError(
            f"row {odd} of this batch {'has' if weighted[odd] else 'has no'} loss_weights but row 0 "
            f"{'has' if weighted[0] else 'has none'}: give every row loss_weights (1.0 for an unweighted "
            "example) or none"
        )
    return weighted[0]
