"""Fitting a conversation to ``max_length``: whole oldest exchanges dropped (leading system messages and
the last trainable exchange kept), then tokens cut from the right (:func:`_fit`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator, Mapping, Sequence
from operator import itemgetter
from typing import Any

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.data.chat_labels import _encode, _encode_text, _Encoded
from hf_shift_loss.options import TrainOn


def _exchanges(messages: Sequence[Mapping[str, Any]]) -> tuple[int, list[int]]:
    """Number of leading system messages, and the start index of every exchange after them.

    An exchange starts at a user message and runs to the next user message (assistant and tool
    messages included), so dropping whole exchanges keeps the conversation starting with a user turn.
    """
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] == "system":
        n_system += 1
    starts = [n_system] + [i for i in range(n_system + 1, len(messages)) if messages[i]["role"] == "user"]
    return n_system, starts


def _first_trainable_after_cut(context_messages: int, n_system: int, cut: int) -> int:
    """Where the context ends in ``messages[:n_system] + messages[cut:]`` (it moves with the kept messages)."""
    if context_messages <= n_system:
        return context_messages
    return max(n_system + context_messages - cut, n_system)


def _candidate_cuts(
    messages: Sequence[Mapping[str, Any]], roles: tuple[str, ...], context_messages: int
) -> tuple[int, list[int]]:
    """The exchange starts that may become the first kept exchange, oldest first.

    A cut is allowed while the kept messages still contain a trainable message (one of a trained role
    at or after the context boundary); the first cut that loses the last one ends the list.
    """
    n_system, starts = _exchanges(messages)
    trained_in_system = any(
        messages[i]["role"] in roles for i in range(min(context_messages, n_system), n_system)
    )
    last_trained = max((i for i, m in enumerate(messages) if m["role"] in roles), default=-1)
    cuts = []
    for cut in starts[1:]:
        if not (trained_in_system or last_trained >= max(context_messages, cut)):
            break
        cuts.append(cut)
    return n_system, cuts


def _token_positions(tokenizer: Any, encoded: _Encoded, char_positions: Sequence[int]) -> list[int]:
    """Index of the first token at or after each (sorted) character position of the rendered text.

    From the offsets (a binary search each); without offsets, by tokenizing the text between
    consecutive positions (an estimate, linear in the text).
    """
    if encoded.offsets is not None:
        offsets = encoded.offsets
        return [bisect.bisect_left(offsets, position, key=itemgetter(0)) for position in char_positions]
    positions, count, previous = [], 0, 0
    for position in char_positions:
        count += len(_encode_text(tokenizer, encoded.text[previous:position])) if position > previous else 0
        positions.append(count)
        previous = max(previous, position)
    return positions


# A request of the cut search: the kept messages to encode and where their context ends.
Request = tuple[list[Mapping[str, Any]], int]
# What encodes a round of requests: ``[(messages, first_trainable, options)]`` -> one _Encoded each.
EncodeMany = Callable[[list[tuple[Sequence[Mapping[str, Any]], int, Mapping[str, Any]]]], list[_Encoded]]


def _drop_oldest_exchanges(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    full: _Encoded,
    max_length: int,
    roles: tuple[str, ...],
    context_messages: int,
) -> Generator[Request, _Encoded, tuple[_Encoded, int]]:
    """The longest tail of whole exchanges (after the leading system messages) that fits ``max_length``.

    Same result as dropping the oldest exchange, re-rendering and re-tokenizing until the rest fits
    (or only the last exchange with a trainable message is left), in linear time:

    1. Estimate, from the one render and tokenization already done, the length after each possible
       cut: the full length minus the tokens between the first exchange's start and the cut's
       exchange start (token positions from the offsets).
    2. Render and tokenize the conversation at the first cut estimated to fit (or the last allowed).
    3. Verify with real renders: if it fits, also render one exchange more and make sure that does
       not fit; if it does not fit, move to the next cut. Templates whose output depends on position
       (a system prompt merged into the first user turn, a date or an index in a header, a default
       system prompt injected only before a user turn) make the estimate off by a few tokens; these
       verification renders are what keeps the result exact, and they walk one exchange at a time
       from the estimate until the answer is confirmed. The only assumption is that dropping an
       exchange never makes the rendered conversation longer.

    A generator, so that :func:`_fit_many` can advance many conversations' searches together: it
    yields each render it needs as ``(kept messages, first_trainable)``, is sent their encoding, and
    returns the encoded kept conversation and the number of messages dropped.
    """
    n_system, cuts = _candidate_cuts(messages, roles, context_messages)
    if not cuts:
        return full, 0
    # A message's boundary: the start of its span, or of the next located message's (not rendered: none).
    boundaries, next_start = [len(full.text)] * len(messages), len(full.text)
    for i in range(len(messages) - 1, -1, -1):
        if full.spans[i] is not None:
            next_start = full.spans[i][0]
        boundaries[i] = next_start
    first, *cut_tokens = _token_positions(
        tokenizer, full, [boundaries[n_system]] + [boundaries[cut] for cut in cuts]
    )
    estimates = [len(full.input_ids) - (tokens - first) for tokens in cut_tokens]
    k = next((k for k, estimate in enumerate(estimates) if estimate <= max_length), len(cuts) - 1)

    renders: dict[int, _Encoded] = {}

    def encoded_at(k: int) -> Generator[Request, _Encoded, _Encoded]:
        if k not in renders:
            cut = cuts[k]
            kept = list(messages[:n_system]) + list(messages[cut:])
            renders[k] = yield kept, _first_trainable_after_cut(context_messages, n_system, cut)
        return renders[k]

    def fits(k: int) -> Generator[Request, _Encoded, bool]:
        return len((yield from encoded_at(k)).input_ids) <= max_length

    if (yield from fits(k)):
        while k > 0 and (yield from fits(k - 1)):
            k -= 1
    else:
        while k + 1 < len(cuts) and not (yield from fits(k)):
            k += 1
    return (yield from encoded_at(k)), cuts[k] - n_system


def _fit(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    encoded: _Encoded,
    max_length: int | None,
    context_messages: int,
    options: Mapping[str, Any],
    train_on: TrainOn,
) -> dict[str, Any]:
    """A whole conversation's encoding cut to ``max_length`` (oldest exchanges first, then tokens from the
    right), as :func:`encode_messages` returns it; each render the cut needs is one :func:`_encode`."""

    def encode_each(requests: list) -> list[_Encoded]:
        return [_encode(tokenizer, kept, first_trainable=first, **opts) for kept, first, opts in requests]

    item = (messages, encoded, context_messages, options)
    return _fit_many(tokenizer, [item], max_length, train_on, encode_each)[0]


def _fit_many(
    tokenizer: Any,
    items: Sequence[tuple[Sequence[Mapping[str, Any]], _Encoded, int, Mapping[str, Any]]],
    max_length: int | None,
    train_on: TrainOn,
    encode_many: EncodeMany,
) -> list[dict[str, Any]]:
    """:func:`_fit` over ``(messages, encoded, context_messages, options)`` items: the too-long ones'
    searches (:func:`_drop_oldest_exchanges`) advance together, each round's renders encoded by one
    ``encode_many`` call (one tokenizer batch call in :func:`encode_conversations`)."""
    searches, pending, found = {}, {}, {}

    def advance(i: int, encoded: _Encoded | None) -> None:
        try:
            pending[i] = searches[i].send(encoded)
        except StopIteration as stop:
            found[i] = stop.value
            pending.pop(i, None)

    for i, (messages, encoded, context_messages, options) in enumerate(items):
        if max_length is not None and len(encoded.input_ids) > max_length:
            searches[i] = _drop_oldest_exchanges(
                tokenizer, messages, encoded, max_length, options["train_roles"], context_messages
            )
            advance(i, None)
    while pending:
        order = list(pending)
        encoded_round = encode_many([(*pending[i], items[i][3]) for i in order])
        for i, encoded in zip(order, encoded_round, strict=True):
            advance(i, encoded)
    return [_cut_right(*found.get(i, (item[1], 0)), max_length, train_on) for i, item in enumerate(items)]


def _cut_right(
    encoded: _Encoded, dropped_turns: int, max_length: int | None, train_on: TrainOn
) -> dict[str, Any]:
    """The kept conversation's tokens past ``max_length`` cut from the right, as :func:`encode_messages`
    returns it."""
    input_ids, labels = encoded.input_ids, encoded.labels
    truncated_tokens = 0
    truncated_completion = 0
    if max_length is not None and len(input_ids) > max_length:
        truncated_tokens = len(input_ids) - max_length
        truncated_completion = int(any(label != IGNORE_INDEX for label in labels[max_length:]))
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if train_on == "all":
        labels = list(input_ids)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "truncated_tokens": truncated_tokens,
        "truncated_completion": truncated_completion,
        "dropped_turns": dropped_turns,
    }
