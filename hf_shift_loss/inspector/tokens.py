"""The text of each token, and the marks both views use for what a token's text cannot show.

Shared by the terminal view (:mod:`~hf_shift_loss.inspector.terminal`) and the HTML view
(:mod:`~hf_shift_loss.inspector.html_view`), so both cut an example into the same pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_shift_loss.constants import IGNORE_INDEX

__all__ = ["NEWLINE_MARK", "SPLIT_MARK", "TAB_MARK", "labelled_pieces", "token_pieces", "visible"]

NEWLINE_MARK = "⏎"
TAB_MARK = "⇥"
SPLIT_MARK = "✂"


def token_pieces(tokenizer: Any, input_ids: Sequence[int]) -> list[tuple[int, int, str]]:
    """The text of each token as ``(first token, end token, text)`` groups, in order.

    Each token's text is ``decode(context + token)`` minus ``decode(context)`` (a few tokens of context),
    so SentencePiece's word-initial spaces survive. Tokens holding part of one UTF-8 character (byte-level
    BPE splits Chinese and emoji) are grouped until the character is complete.
    """

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[tuple[int, int, str]] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        context = input_ids[max(0, start - 4) : start]
        before, after = decode(context), decode(list(context) + list(input_ids[start:end]))
        text = after[len(before) :] if after.startswith(before) else decode(input_ids[start:end])
        if text.endswith("\ufffd") and end < len(input_ids) and end - start < 4:
            continue  # an incomplete character: wait for its remaining bytes
        pieces.append((start, end, text))
        start = end
    return pieces


def labelled_pieces(
    tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]
) -> list[tuple[int, int, str, bool]]:
    """:func:`token_pieces` with whether each piece is trained (a label other than -100 among its tokens)."""
    return [
        (start, end, text, any(label != IGNORE_INDEX for label in labels[start:end]))
        for start, end, text in token_pieces(tokenizer, input_ids)
    ]


def visible(text: str) -> str:
    """``text`` with tabs and newlines marked (a newline keeps its line break after the mark)."""
    return text.replace("\t", TAB_MARK).replace("\n", NEWLINE_MARK + "\n")
