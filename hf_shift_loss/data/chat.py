"""Multi-turn chat masking for any chat template, without ``{% generation %}``.

A conversation is rendered once with the tokenizer's own chat template, each message's content is
located in the rendered *text* (character spans), and the rendered text is tokenized once with offsets.
A token is trained when its characters overlap a trained character span. The trained spans are the
content of every message whose role is in ``train_roles`` plus the end-of-turn marker the template puts
after it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...), so the model learns to stop.

Why characters and not token search: a response template such as ``"<|im_start|>assistant\\n"`` tokenizes
differently depending on what precedes it, so searching for its token ids fails or matches the wrong
place; character spans are exact whatever the tokenizer does at the boundaries.

Tool calls: an assistant message with ``tool_calls`` (the transformers/OpenAI format, ``content`` None,
absent or text) has no content string to search for. Its span is what the template renders for it
between its header and its end of turn (the ``<tool_call>...</tool_call>`` JSON, any text before it),
found from the template's own scaffolding: a probe render gives the text before each message (previous
end of turn + header) and after the last one, and the tool-call body is what lies between them (see
:func:`locate_spans`). ``tool`` results, ``tools`` schemas (``chat_template_kwargs={"tools": [...]}``)
and any role outside ``train_roles`` (``developer``, ...) are rendered and masked.

``input_ids`` are exactly ``tokenizer.apply_chat_template(messages, tokenize=True)``: the template
renders BOS and every special token itself, so the text is tokenized with ``add_special_tokens=False``
(no double BOS). Labels are aligned with ``input_ids`` (``-100`` where not trained); the loss shifts.
A conversation with nothing to train (no message of a trained role) comes back with every label
``-100``, so the caller's ``on_untrained`` policy decides (drop and count, or raise naming the row).
See docs/chat-masking.md.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.options import END_OF_TURN_MODES, TRAIN_ON, EndOfTurnMode, TrainOn, check_choice

# What is trained by default: every assistant turn with the end-of-turn token after it.
DEFAULT_TRAIN_ROLES = ("assistant",)
DEFAULT_END_OF_TURN: EndOfTurnMode = "turn"
STANDARD_ROLES = ("system", "user", "assistant", "tool")

__all__ = ["encode_conversations", "encode_messages", "STANDARD_ROLES"]

Span = tuple[int, int]


def _where(example_index: int | None) -> str:
    return f"row {example_index}" if example_index is not None else "conversation"


def _normalize_train_roles(train_roles: str | Sequence[str]) -> tuple[str, ...]:
    # A bare string would otherwise be iterated character by character.
    roles = (train_roles,) if isinstance(train_roles, str) else tuple(train_roles)
    if not roles or not all(isinstance(role, str) and role for role in roles):
        raise ValueError(f"train_roles must be a non-empty sequence of role names, got {train_roles!r}")
    return roles


def has_tool_calls(message: Mapping[str, Any]) -> bool:
    """Whether a (validated) message carries tool calls."""
    return bool(message.get("tool_calls"))


def validate_messages(messages: Any, example_index: int | None = None) -> list[Mapping[str, Any]]:
    """Check the shape of a conversation; raise a ValueError naming the row and message index.

    Every message is a dict with a ``role`` (any non-empty string: the template decides which it
    renders) and a ``content`` string; a message with ``tool_calls`` (a non-empty list of dicts) may
    have ``content`` None, absent or a string. Whether anything is trained is not checked here: a
    conversation without a trained role is encoded with every label masked.
    """
    where = _where(example_index)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__} {str(messages)[:80]!r}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where}, message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}"
            )
        if "role" not in message:
            raise ValueError(
                f"{where}, message {i}: missing key 'role' (keys: {sorted(map(str, message))}); every message "
                "needs 'role' and 'content'"
            )
        role = message["role"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}, message {i}: 'role' must be a non-empty str, got {role!r}")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and (
            not isinstance(tool_calls, (list, tuple)) or not all(isinstance(c, Mapping) for c in tool_calls)
        ):
            raise ValueError(
                f"{where}, message {i} (role {role!r}): 'tool_calls' must be a list of "
                "{'type': 'function', 'function': {'name': ..., 'arguments': ...}} dicts, got "
                f"{str(tool_calls)[:80]!r}"
            )
        if tool_calls:
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise ValueError(
                    f"{where}, message {i} (role {role!r}): content must be a str or None next to "
                    f"'tool_calls', got {type(content).__name__}"
                )
            continue
        if "content" not in message:
            raise ValueError(
                f"{where}, message {i}: missing key 'content' (keys: {sorted(map(str, message))}); every "
                "message needs 'role' and 'content' (or 'tool_calls')"
            )
        if not isinstance(message["content"], str):
            raise ValueError(
                f"{where}, message {i} (role {role!r}): content must be a str, got "
                f"{type(message['content']).__name__}; render structured or multimodal content to text first"
            )
    return list(messages)


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    chat_template_kwargs: Mapping[str, Any],
    example_index: int | None = None,
) -> str:
    """The conversation as the chat template renders it (a str, special tokens as text).

    Whatever the template raises (``raise_exception``, a role or a tool call it does not support, no
    template at all) becomes a ValueError naming the row.
    """
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, **chat_template_kwargs)
    except Exception as error:
        raise ValueError(
            f"{_where(example_index)}: the chat template cannot render this conversation "
            f"({type(error).__name__}: {error}); check the roles, tool calls and tools it supports"
        ) from error
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def generation_prompt_suffix(tokenizer: Any, chat_template_kwargs: Mapping[str, Any]) -> str:
    """What ``add_generation_prompt=True`` appends after a user turn (``<|im_start|>assistant\\n``), or ""."""
    probe = [{"role": "user", "content": _sentinel(0)}]
    try:
        with_prompt = tokenizer.apply_chat_template(
            probe, tokenize=False, add_generation_prompt=True, **chat_template_kwargs
        )
        without = tokenizer.apply_chat_template(probe, tokenize=False, **chat_template_kwargs)
    except Exception:  # a template that cannot render a lone user turn: no known generation prompt
        return ""
    return with_prompt[len(without) :] if with_prompt.startswith(without) else ""


def _sentinel(i: int) -> str:
    # Private-use characters: never in a template, untouched by `trim`.
    return f"\ue000{i}\ue001"


def _separators(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], chat_template_kwargs: Mapping[str, Any]
) -> tuple[list[str | None], str | None]:
    """The template text before each message's content, and after the last one, from a sentinel render.

    ``separators[i]`` is the text between message ``i - 1``'s content (or the start) and message ``i``'s
    content: end-of-turn of ``i - 1`` + header of ``i`` (+ an injected system prompt before message 0).
    It pins each content to its exact position, so a short content ("a") is never found inside a
    header ("assistant"). ``None`` where the template does not render a message's content at all. The
    probe renders every message as plain text (its tool calls removed), so a tool-call message's
    header and end of turn are learned too. The tail is the text after the last message's content
    (its end of turn and what the template appends), ``None`` if that content is not rendered.
    """
    probe = [
        {**{k: v for k, v in message.items() if k != "tool_calls"}, "content": _sentinel(i)}
        for i, message in enumerate(messages)
    ]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, **chat_template_kwargs)
    except Exception:
        # Content-dependent templates may reject the probe; plain forward search still works.
        return [None] * len(messages), None
    separators: list[str | None] = []
    cursor = 0
    found_last = False
    for i in range(len(messages)):
        start = text.find(_sentinel(i), cursor)
        found_last = start >= 0
        if start < 0:
            separators.append(None)
            continue
        separators.append(text[cursor:start])
        cursor = start + len(_sentinel(i))
    return separators, text[cursor:] if found_last else None


def _common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the common prefix of two strings or two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


def _cannot_locate(example_index: int | None, i: int, message: Mapping[str, Any], what: str) -> ValueError:
    return ValueError(
        f"{_where(example_index)}, message {i} (role {message['role']!r}): its {what} cannot be found in the "
        "rendered chat template; the template rewrites or drops it. Normalize the content to what the "
        "template renders, pass a template that keeps it verbatim (set tokenizer.chat_template), or "
        "pre-tokenize the example as {'input_ids', 'labels'}"
    )


def _locate_content(text: str, cursor: int, content: str, separator: str | None) -> Span | None:
    """Span of a content string: right after its separator, else forward from ``cursor``, else stripped."""
    if separator is not None and text.startswith(separator, cursor):
        expected = cursor + len(separator)
        for candidate in (content, content.strip()):
            if text.startswith(candidate, expected):
                return expected, expected + len(candidate)
    for candidate in (content, content.strip()):
        start = text.find(candidate, cursor) if candidate else -1
        if start >= 0:
            return start, start + len(candidate)
    return None


def _locate_tool_call(
    text: str,
    cursor: int,
    i: int,
    messages: Sequence[Mapping[str, Any]],
    separators: Sequence[str | None],
    tail: str | None,
) -> Span | None:
    """Span of what the template renders for a tool-call message between its header and its end of turn.

    Start: after the longest prefix of the text at ``cursor`` (the end of the previous message) that
    agrees with the plain-message separator (previous end of turn + this header). End: where the next
    message's separator (this end of turn + next header) begins, found with the next message's content
    right after it when it has one; for the last message, before the longest suffix that agrees with
    the probe's tail. Templates that give tool calls their own header (``[TOOL_CALLS]``) keep it in
    the span: only the scaffolding shared with plain messages is left out.
    """
    separator = separators[i]
    if separator is None:
        return None
    start = cursor + _common_prefix(separator, text[cursor : cursor + len(separator)])
    if i + 1 == len(messages):
        if tail is None:
            return None
        end = len(text) - _common_suffix(tail, text[start:])
        return (start, end) if end >= start else None
    following, next_separator = messages[i + 1], separators[i + 1]
    if next_separator is None:
        return None
    if has_tool_calls(following) or not following["content"]:
        end = text.find(next_separator, start)
        return (start, end) if end >= 0 else None
    for candidate in (following["content"], following["content"].strip()):
        if candidate:
            end = text.find(next_separator + candidate, start)
            if end >= 0:
                return start, end
    # The end of turn after a tool call differs from the plain one: keep the part that agrees.
    for candidate in (following["content"], following["content"].strip()):
        position = text.find(candidate, start) if candidate else -1
        if position >= 0:
            return start, position - _common_suffix(next_separator, text[start:position])
    return None


def locate_spans(
    text: str,
    messages: Sequence[Mapping[str, Any]],
    separators: Sequence[str | None],
    tail: str | None,
    train_roles: tuple[str, ...],
    example_index: int | None = None,
) -> list[Span | None]:
    """Character span ``(start, end)`` of every message's content in the rendered text, in order.

    Each content is first expected right after its separator; else searched forward from the end of
    the previous content (so assistant text repeating user text is not confused); else its stripped
    form (templates that ``trim``). A tool-call message's span is its rendered body
    (:func:`_locate_tool_call`). A message the template does not render gets ``None`` unless its
    role is trained, which is an error.
    """
    spans: list[Span | None] = []
    cursor = 0
    for i, message in enumerate(messages):
        trained = message["role"] in train_roles
        if has_tool_calls(message):
            span = _locate_tool_call(text, cursor, i, messages, separators, tail)
            if span is None and trained:
                raise _cannot_locate(example_index, i, message, "tool call")
        else:
            content: str = message["content"]
            span = _locate_content(text, cursor, content, separators[i])
            # An empty content that cannot be placed has nothing to train: it stays unlocated.
            if span is None and content.strip() and (trained or separators[i] is not None):
                raise _cannot_locate(example_index, i, message, "content")
        spans.append(span)
        if span is not None:
            cursor = span[1]
    return spans


def end_of_turn_markers(tokenizer: Any) -> list[str]:
    """Strings of the special and added tokens (and EOS), longest first, that can end a turn."""
    markers = {str(token) for token in getattr(tokenizer, "all_special_tokens", [])}
    markers |= {str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    if getattr(tokenizer, "eos_token", None):
        markers.add(str(tokenizer.eos_token))
    return sorted((m for m in markers if m), key=len, reverse=True)


def find_end_of_turn(text: str, content_end: int, limit: int, markers: Sequence[str]) -> int | None:
    """End (exclusive) of the end-of-turn marker right after a content, or None.

    The marker is the first special/added token after ``content_end``, separated from it by whitespace
    only and starting before ``limit`` (the next message's content). Whitespace the template puts before
    the marker is part of the turn's end: the model must generate it to reach the marker.
    """
    position = content_end
    while position < limit and text[position].isspace():
        position += 1
    for marker in markers:
        if position + len(marker) <= limit and text.startswith(marker, position):
            return position + len(marker)
    return None


def trained_char_spans(
    text: str,
    messages: Sequence[Mapping[str, Any]],
    spans: Sequence[Span | None],
    markers: Sequence[str],
    *,
    train_roles: tuple[str, ...],
    train_end_of_turn: EndOfTurnMode,
    last_turn_only: bool,
    first_trainable: int = 0,
) -> list[Span]:
    """Sorted, disjoint character spans whose overlapping tokens are trained (linear in the messages).

    Messages before ``first_trainable`` are context (a conversational prompt): never trained.
    """
    trainable = [
        i
        for i, m in enumerate(messages)
        if i >= first_trainable and m["role"] in train_roles and spans[i] is not None
    ]
    if last_turn_only:
        trainable = trainable[-1:]
    trainable_set = set(trainable)
    last_trained = trainable[-1] if trainable else None
    located = [i for i, span in enumerate(spans) if span is not None]
    trained: list[Span] = []
    for position, i in enumerate(located):
        start, end = spans[i]
        limit = spans[located[position + 1]][0] if position + 1 < len(located) else len(text)
        is_trained = i in trainable_set
        if train_end_of_turn == "turn":
            wants_end = is_trained
        elif train_end_of_turn == "last":
            wants_end = i == last_trained
        elif train_end_of_turn == "all":
            # Every located message's end of turn, trained or not (content of untrained ones stays masked).
            wants_end = True
        else:
            wants_end = False
        end_of_turn = find_end_of_turn(text, end, limit, markers) if wants_end else None
        if is_trained and end > start:
            trained.append((start, end_of_turn or end))
        elif end_of_turn is not None:
            trained.append((end, end_of_turn))
    return sorted(trained)


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
    token_starts = [start for start, _ in offsets]

    def straddles(boundary: int) -> bool:
        index = bisect.bisect_left(token_starts, boundary) - 1  # the last token starting before it
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
    token_bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
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
        starts = [start for start, _ in encoded.offsets]
        return [bisect.bisect_left(starts, position) for position in char_positions]
    positions, count, previous = [], 0, 0
    for position in char_positions:
        count += len(_encode_text(tokenizer, encoded.text[previous:position])) if position > previous else 0
        positions.append(count)
        previous = max(previous, position)
    return positions


def _drop_oldest_exchanges(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    full: _Encoded,
    max_length: int,
    roles: tuple[str, ...],
    context_messages: int,
    options: Mapping[str, Any],
) -> tuple[_Encoded, int]:
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

    Returns the encoded kept conversation and the number of messages dropped.
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

    def encoded_at(k: int) -> _Encoded:
        if k not in renders:
            cut = cuts[k]
            kept = list(messages[:n_system]) + list(messages[cut:])
            first_trainable = _first_trainable_after_cut(context_messages, n_system, cut)
            renders[k] = _encode(tokenizer, kept, first_trainable=first_trainable, **options)
        return renders[k]

    def fits(k: int) -> bool:
        return len(encoded_at(k).input_ids) <= max_length

    if fits(k):
        while k > 0 and fits(k - 1):
            k -= 1
    else:
        while k + 1 < len(cuts) and not fits(k):
            k += 1
    return encoded_at(k), cuts[k] - n_system


def encode_messages(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    train_roles: str | Sequence[str] = DEFAULT_TRAIN_ROLES,
    train_end_of_turn: EndOfTurnMode = DEFAULT_END_OF_TURN,
    train_on: TrainOn = "completion",
    max_length: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    example_index: int | None = None,
    context_messages: int = 0,
    last_turn_only: bool | None = None,
) -> dict[str, Any]:
    """Tokenize a conversation with its chat template and mask everything but the trained turns.

    Args:
        tokenizer: a tokenizer with a chat template (fast tokenizers use offsets; slow ones fall back to
            prefix tokenization).
        messages: ``[{"role": ..., "content": str}, ...]``; any role the template renders (system,
            user, assistant, tool, developer, ...): only ``train_roles`` are trained. A message with
            ``tool_calls`` (``[{"type": "function", "function": {"name": ..., "arguments": ...}}]``)
            may have ``content`` None or absent; its call as the template renders it is trained when
            its role is. Extra keys are passed to the template untouched.
        train_roles: roles whose content is trained.
        train_end_of_turn: which end-of-turn markers are trained: ``"turn"`` after every trained
            message, ``"last"`` only after the last trained message, ``"all"`` after every message
            (untrained messages' content stays masked), ``"none"`` never.
        train_on: as everywhere else (:class:`hf_shift_loss.ShiftLossArguments`, :class:`Encoder`):
            ``"completion"`` trains every message of ``train_roles`` (after ``context_messages``);
            ``"last_turn"`` only the last one (earlier ones are context); ``"all"`` every token (the
            masks above are computed, then every label is its token; truncation is the same).
        max_length: if the conversation is longer, drop the oldest exchanges (user turn up to the next
            user turn) while keeping leading system messages and the last exchange with a trained
            message; if that is still too long, cut tokens from the right. Linear time: one render
            and tokenization of the whole conversation picks the cut, a few renders of the kept part
            verify it (see :func:`_drop_oldest_exchanges`).
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template`` (``tools``, ...).
        example_index: the example's row in its dataset, named in error messages.
        context_messages: the first ``context_messages`` messages are never trained, whatever their role
            (a conversational ``prompt`` followed by its ``completion`` messages).
        last_turn_only: deprecated, use ``train_on="last_turn"`` (``True``) or ``train_on="completion"``
            (``False``); it warns (``FutureWarning``) and will be removed in the next release.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated_tokens": int, "dropped_turns": int,
        "truncated_completion": int}``: labels aligned with input_ids (``-100`` where not trained, all
        of them when no message is trainable); ``truncated_tokens`` counts tokens cut from the right,
        ``dropped_turns`` the messages dropped from the left, ``truncated_completion`` is 1 when the
        right cut removed trained tokens.

    Raises:
        ValueError: naming the row (and message): malformed messages, a template that cannot render
            them, or a trained message the template rewrites so that it cannot be found.

    Examples:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> encoded = encode_messages(tokenizer, [{"role": "user", "content": "Capital of France?"},
        ...                                       {"role": "assistant", "content": "Paris."}])  # doctest: +SKIP
        >>> tokenizer.decode([t for t in encoded["labels"] if t != -100])  # doctest: +SKIP
        'Paris.<|im_end|>'
    """
    if last_turn_only is not None:
        train_on = _train_on_from_last_turn_only(last_turn_only, train_on)
    roles = _check_options(train_roles, train_on, train_end_of_turn, max_length)
    messages = validate_messages(messages, example_index)
    options = dict(
        train_roles=roles,
        train_end_of_turn=train_end_of_turn,
        last_turn_only=train_on == "last_turn",
        chat_template_kwargs=dict(chat_template_kwargs or {}),
        example_index=example_index,
    )
    encoded = _encode(tokenizer, messages, first_trainable=context_messages, **options)
    return _fit(tokenizer, messages, encoded, max_length, context_messages, options, train_on)


def encode_conversations(
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    train_roles: str | Sequence[str] = DEFAULT_TRAIN_ROLES,
    train_end_of_turn: EndOfTurnMode = DEFAULT_END_OF_TURN,
    train_on: TrainOn = "completion",
    max_length: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    example_indices: Sequence[int | None] | None = None,
    context_messages: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """:func:`encode_messages` over a batch of conversations: the same result for each, computed faster.

    Each conversation is rendered on its own (the sentinel render is shared by conversations of the
    same shape: same roles and keys), then all rendered texts are tokenized in one call (a fast
    tokenizer encodes a batch in Rust, its offsets give the spans), and labels are built with numpy.
    Only conversations longer than ``max_length`` are rendered again (:func:`_drop_oldest_exchanges`).

    Args:
        conversations: one message list per example; the other arguments are :func:`encode_messages`'s,
            ``example_indices`` and ``context_messages`` given per conversation (None: no index, 0).

    Returns:
        One :func:`encode_messages` dict per conversation, in order.

    Examples:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> rows = encode_conversations(tokenizer, [[{"role": "user", "content": "2+2?"},
        ...                                          {"role": "assistant", "content": "4"}]] * 2)  # doctest: +SKIP
        >>> rows[0] == rows[1]  # doctest: +SKIP
        True
    """
    roles = _check_options(train_roles, train_on, train_end_of_turn, max_length)
    count = len(conversations)
    indices = list(example_indices) if example_indices is not None else [None] * count
    contexts = list(context_messages) if context_messages is not None else [0] * count
    if not len(indices) == len(contexts) == count:
        raise ValueError(
            f"{count} conversations but {len(indices)} example_indices and {len(contexts)} context_messages"
        )
    cache: dict = {}
    kwargs = dict(chat_template_kwargs or {})
    prepared = []
    for messages, index, context in zip(conversations, indices, contexts, strict=True):
        messages = validate_messages(messages, index)
        options = dict(
            train_roles=roles,
            train_end_of_turn=train_end_of_turn,
            last_turn_only=train_on == "last_turn",
            chat_template_kwargs=kwargs,
            example_index=index,
            cache=cache,
        )
        rendered = _render(tokenizer, messages, first_trainable=context, **options)
        prepared.append((messages, context, options, rendered))
    tokenized = _tokenize_batch(tokenizer, [rendered.text for *_, rendered in prepared])
    results = []
    for position, (messages, context, options, rendered) in enumerate(prepared):
        tokens = tokenized[position] if tokenized is not None else None
        encoded = _label(tokenizer, rendered, kwargs, options["example_index"], cache, tokens)
        results.append(_fit(tokenizer, messages, encoded, max_length, context, options, train_on))
    return results


def _check_options(
    train_roles: str | Sequence[str],
    train_on: TrainOn,
    train_end_of_turn: EndOfTurnMode,
    max_length: int | None,
) -> tuple[str, ...]:
    roles = _normalize_train_roles(train_roles)
    check_choice("train_on", train_on, TRAIN_ON)
    check_choice("train_end_of_turn", train_end_of_turn, END_OF_TURN_MODES)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    return roles


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
    return [
        (list(ids), [tuple(o) for o in row_offsets])
        for ids, row_offsets in zip(encoding["input_ids"], offsets, strict=True)
    ]


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
    right), as :func:`encode_messages` returns it."""
    dropped_turns = 0
    if max_length is not None and len(encoded.input_ids) > max_length:
        encoded, dropped_turns = _drop_oldest_exchanges(
            tokenizer, messages, encoded, max_length, options["train_roles"], context_messages, options
        )
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


def _train_on_from_last_turn_only(last_turn_only: bool, train_on: TrainOn) -> TrainOn:
    """The ``train_on`` that the deprecated ``last_turn_only`` keyword means (warned once per call site)."""
    replacement = "last_turn" if last_turn_only else "completion"
    warnings.warn(
        f"encode_messages(last_turn_only={last_turn_only!r}) is deprecated and will be removed in the next "
        f"release; use train_on={replacement!r}",
        FutureWarning,
        stacklevel=3,
    )
    if train_on != "completion":
        raise ValueError(
            f"encode_messages got last_turn_only={last_turn_only!r} and train_on={train_on!r}; pass train_on "
            "only"
        )
    return replacement
