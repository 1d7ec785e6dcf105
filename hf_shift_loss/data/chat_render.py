"""Rendering a conversation with its chat template and locating its messages as character spans.

The first half of :mod:`hf_shift_loss.data.chat` (see its docstring): the message checks, the render,
the sentinel render that finds the template's scaffolding, each message's span in the rendered text and
the trained character spans (content plus end-of-turn marker). No tokenizer call but the template's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hf_shift_loss.options import EndOfTurnMode

# What is trained by default: every assistant turn with the end-of-turn token after it.
DEFAULT_TRAIN_ROLES = ("assistant",)
DEFAULT_END_OF_TURN: EndOfTurnMode = "turn"
STANDARD_ROLES = ("system", "user", "assistant", "tool")

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
