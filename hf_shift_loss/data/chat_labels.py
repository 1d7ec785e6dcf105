"""Token labels from character spans: one tokenization with offsets (one batch call for many texts),
a token trained when its characters overlap a trained span; prefix tokenization where a tokenizer has
no offsets. Also the one-conversation pipeline (:func:`_encode`: render, locate, tokenize, label).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.data.chat_render import (
    Span,
    _common_prefix,
    _separators,
    _where,
    end_of_turn_markers,
    generation_prompt_suffix,
    locate_spans,
    render_chat,
    trained_char_spans,
)
from hf_shift_loss.options import EndOfTurnMode


def _tokenize_with_offsets(
    tokenizer: Any, text: str, example_index: int | None = None
) -> tuple[list[int], list[Span] | None]:
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        encoding = None  # slow tokenizers may refuse offsets: tokenize without them
    except Exception as error:
        raise ValueError(
            f"{_where(example_index)}: the tokenizer cannot encode the rendered chat: {error}"
        ) from error
    if encoding is None:
        encoding = tokenizer(text, add_special_tokens=False)
    offsets = encoding.get("offset_mapping")
    # Slow tokenizers silently ignore return_offsets_mapping (or raise): fall back to prefix tokenization.
    return list(encoding["input_ids"]), [tuple(o) for o in offsets] if offsets is not None else None


def _split_at_answer_starts(
    tokenizer: Any,
    text: str,
    input_ids: list[int],
    offsets: list[Span],
    char_spans: list[Span],
    suffix: str,
    example_index: int | None,
) -> tuple[list[int], list[Span]]:
    """Re-tokenize so that no token straddles the start of a trained span where a prompt would end.

    Byte-level BPE merges across the template/answer boundary: SmolLM2 turns the ``\\n`` that ends
    ``<|im_start|>assistant\\n`` and an answer's leading spaces into one token, so the context would end
    at ``assistant`` while generation (``add_generation_prompt=True``) ends with a separate ``\\n``: the
    model would be trained on a prompt it never sees. Where a token straddles a trained span's start
    and the text before it ends with the template's generation prompt, the text is tokenized in pieces
    split there (as the prompt and the answer are at generation time); elsewhere the tokens stay exactly
    those of the whole rendered text (a SentencePiece ``▁Paris`` after Mistral's ``[/INST]`` also spans
    the answer's start, and is what generation produces there). ``suffix`` is
    :func:`generation_prompt_suffix`'s.
    """

    def straddles(boundary: int) -> bool:
        # The last token starting before the boundary (a search on the offsets' starts, no list built).
        index = bisect.bisect_left(offsets, boundary, key=itemgetter(0)) - 1
        return index >= 0 and offsets[index][1] > boundary

    boundaries = sorted({start for start, _ in char_spans})
    straddled = [b for b in boundaries if suffix and text.endswith(suffix, 0, b) and straddles(b)]
    if not straddled:
        return input_ids, offsets
    split_ids: list[int] = []
    split_offsets: list[Span] = []
    for piece_start, piece_end in zip([0, *straddled], [*straddled, len(text)], strict=True):
        piece_ids, piece_offsets = _tokenize_with_offsets(
            tokenizer, text[piece_start:piece_end], example_index
        )
        split_ids += piece_ids
        split_offsets += [(piece_start + s, piece_start + e) for s, e in piece_offsets]
    return split_ids, split_offsets


def _labels_from_offsets(input_ids: list[int], offsets: list[Span], char_spans: list[Span]) -> list[int]:
    """A token is trained when its characters overlap a trained span (sorted, disjoint): the first span
    ending after the token's start is the only one that can (numpy, one search per token)."""
    if not char_spans or not input_ids:
        return [IGNORE_INDEX] * len(input_ids)
    # fromiter over the flattened pairs: a third of np.asarray's time on a list of tuples.
    token_bounds = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
    token_bounds = token_bounds.reshape(-1, 2)
    span_bounds = np.asarray(char_spans, dtype=np.int64)
    candidate = np.searchsorted(span_bounds[:, 1], token_bounds[:, 0], side="right")
    has_candidate = candidate < len(span_bounds)
    trained = has_candidate & (
        span_bounds[np.minimum(candidate, len(span_bounds) - 1), 0] < token_bounds[:, 1]
    )
    return np.where(trained, np.asarray(input_ids, dtype=np.int64), IGNORE_INDEX).tolist()


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _labels_by_prefix_tokenization(
    tokenizer: Any, text: str, input_ids: list[int], char_spans: list[Span]
) -> list[int]:
    """Labels for a tokenizer without offsets: tokenize the text up to each span boundary.

    Tokens of ``text[:b]`` that agree with the full tokenization end before ``b``; where they disagree
    a token straddles ``b`` and, as with offsets, a token overlapping a trained span is trained.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    for span_start, span_end in char_spans:
        first = _common_prefix(_encode_text(tokenizer, text[:span_start]), input_ids)
        before_end = _encode_text(tokenizer, text[:span_end])
        agreed = _common_prefix(before_end, input_ids)
        last = len(before_end) if agreed == len(before_end) else agreed + 1
        for t in range(first, min(last, len(input_ids))):
            labels[t] = input_ids[t]
    return labels


@dataclass
class _Encoded:
    """One render of a conversation: its text, message spans, tokens (with offsets when available)."""

    text: str
    spans: list[Span | None]
    input_ids: list[int]
    offsets: list[Span] | None
    labels: list[int]


@dataclass
class _Rendered:
    """A conversation rendered and located, not yet tokenized: its text and trained character spans."""

    text: str
    spans: list[Span | None]
    char_spans: list[Span]


def _cached(cache: dict | None, key: Any, compute: Any) -> Any:
    """``compute()``, memoized in ``cache`` (one dict per batch of conversations: same tokenizer and options)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _probe_key(messages: Sequence[Mapping[str, Any]]) -> tuple:
    """What the sentinel render (:func:`_separators`) depends on: every key but the contents and tool calls."""
    return tuple(
        tuple((key, repr(value)) for key, value in message.items() if key not in ("content", "tool_calls"))
        for message in messages
    )


def _render(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    train_roles: tuple[str, ...],
    train_end_of_turn: EndOfTurnMode,
    last_turn_only: bool,
    chat_template_kwargs: Mapping[str, Any],
    example_index: int | None,
    first_trainable: int = 0,
    cache: dict | None = None,
) -> _Rendered:
    """Render (plus one sentinel render, shared by conversations of the same shape) and locate."""
    text = render_chat(tokenizer, messages, chat_template_kwargs, example_index)
    separators, tail = _cached(
        cache,
        ("separators", _probe_key(messages)),
        lambda: _separators(tokenizer, messages, chat_template_kwargs),
    )
    spans = locate_spans(text, messages, separators, tail, train_roles, example_index)
    char_spans = trained_char_spans(
        text,
        messages,
        spans,
        _cached(cache, "markers", lambda: end_of_turn_markers(tokenizer)),
        train_roles=train_roles,
        train_end_of_turn=train_end_of_turn,
        last_turn_only=last_turn_only,
        first_trainable=first_trainable,
    )
    return _Rendered(text, spans, char_spans)


def _label(
    tokenizer: Any,
    rendered: _Rendered,
    chat_template_kwargs: Mapping[str, Any],
    example_index: int | None,
    cache: dict | None = None,
    tokenized: tuple[list[int], list[Span]] | None = None,
) -> _Encoded:
    """Tokenize the rendered text once (or take ``tokenized``, its ids and offsets from a batch) and label it."""
    text, char_spans = rendered.text, rendered.char_spans
    input_ids, offsets = tokenized or _tokenize_with_offsets(tokenizer, text, example_index)
    if offsets is not None:
        suffix = _cached(cache, "suffix", lambda: generation_prompt_suffix(tokenizer, chat_template_kwargs))
        input_ids, offsets = _split_at_answer_starts(
            tokenizer, text, input_ids, offsets, char_spans, suffix, example_index
        )
        labels = _labels_from_offsets(input_ids, offsets, char_spans)
    else:
        labels = _labels_by_prefix_tokenization(tokenizer, text, input_ids, char_spans)
    return _Encoded(text, rendered.spans, input_ids, offsets, labels)


def _encode(tokenizer: Any, messages: Sequence[Mapping[str, Any]], **options: Any) -> _Encoded:
    """Render (plus one sentinel render), locate, tokenize once and label one conversation
    (``options``: :func:`_render`'s keywords)."""
    rendered = _render(tokenizer, messages, **options)
    return _label(
        tokenizer, rendered, options["chat_template_kwargs"], options["example_index"], options.get("cache")
    )


def _encode_many(
    tokenizer: Any, requests: Sequence[tuple[Sequence[Mapping[str, Any]], int, Mapping[str, Any]]]
) -> list[_Encoded]:
    """:func:`_encode` over ``(messages, first_trainable, options)`` requests: each conversation rendered
    on its own, all the rendered texts tokenized in one call (:func:`_tokenize_batch`), each labeled."""
    rendered = [
        _render(tokenizer, messages, first_trainable=first_trainable, **options)
        for messages, first_trainable, options in requests
    ]
    tokenized = _tokenize_batch(tokenizer, [r.text for r in rendered])
    return [
        _label(
            tokenizer,
            r,
            options["chat_template_kwargs"],
            options["example_index"],
            options.get("cache"),
            tokenized[position] if tokenized is not None else None,
        )
        for position, (r, (_, _, options)) in enumerate(zip(rendered, requests, strict=True))
    ]


def _tokenize_batch(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[Span]]] | None:
    """Ids and offsets of every text from one batch call, or None where the tokenizer gives no offsets
    or refuses a text (each is then tokenized on its own, which names the row that fails)."""
    if not texts or not getattr(tokenizer, "is_fast", False):
        return None
    try:
        encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:
        return None
    offsets = encoding.get("offset_mapping")
    if offsets is None:
        return None
    # The offsets are the fast tokenizer's lists of (start, end) tuples already: taken as they are.
    return list(zip(encoding["input_ids"], offsets, strict=True))
