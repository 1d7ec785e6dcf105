"""Packing decided on the lengths alone: the pieces (``packing_overflow``) and best-fit decreasing rows.

The planning half of :mod:`hf_shift_loss.data.pack` (see its docstring): int arrays in, a
:class:`PackingPlan` out; the packer writes the rows it decides.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.options import PACKING_OVERFLOWS, PackingOverflow, check_choice, check_max_length


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
