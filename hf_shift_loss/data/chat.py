"""Multi-turn chat masking for any chat template, without ``{% generation %}``.

A conversation is rendered once with the tokenizer's own chat template, each message's content is
located in the rendered *text* (character spans), and the rendered text is tokenized once with offsets.
A token is trained when its characters overlap a trained character span. The trained spans are the
content of every message whose role is in ``train_roles`` plus the end-of-turn marker the template puts
after it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...), so the model learns to stop.

Why characters and not token search: a response template such as ``"<|im_start|>assistant\\n"`` tokenizes
differently depending on what precedes it, so searching for its token ids fails or matches the wrong
place; character spans are exact whatever the tokenizer does at the boundaries.

``input_ids`` are exactly ``tokenizer.apply_chat_template(messages, tokenize=True)``: the template
renders BOS and every special token itself, so the text is tokenized with ``add_special_tokens=False``
(no double BOS). Labels are aligned with ``input_ids`` (``-100`` where not trained); the loss shifts.
See docs/chat-masking.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from hf_shift_loss.loss import IGNORE_INDEX

EndOfTurnMode = Literal["turn", "last", "all", "none"]
END_OF_TURN_MODES = ("turn", "last", "all", "none")
# What is trained by default: every assistant turn with the end-of-turn token after it.
DEFAULT_TRAIN_ROLES = ("assistant",)
DEFAULT_END_OF_TURN: EndOfTurnMode = "turn"
STANDARD_ROLES = ("system", "user", "assistant", "tool")

__all__ = ["encode_messages", "END_OF_TURN_MODES", "STANDARD_ROLES"]


def _where(example_index: int | None) -> str:
    return f"example {example_index}" if example_index is not None else "conversation"


def _normalize_train_roles(train_roles: str | Sequence[str]) -> tuple[str, ...]:
    # A bare string would otherwise be iterated character by character.
    roles = (train_roles,) if isinstance(train_roles, str) else tuple(train_roles)
    if not roles or not all(isinstance(role, str) and role for role in roles):
        raise ValueError(f"train_roles must be a non-empty sequence of role names, got {train_roles!r}")
    return roles


def validate_messages(
    messages: Any, train_roles: tuple[str, ...], example_index: int | None = None
) -> list[Mapping[str, Any]]:
    """Check the shape of a conversation; raise a ValueError naming the example and message index."""
    where = _where(example_index)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__} {str(messages)[:80]!r}"
        )
    allowed_roles = set(STANDARD_ROLES) | set(train_roles)
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where}, message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(
                    f"{where}, message {i}: missing key {key!r} (keys: {sorted(message)}); every message "
                    "needs 'role' and 'content'"
                )
        role, content = message["role"], message["content"]
        if role not in allowed_roles:
            raise ValueError(
                f"{where}, message {i}: unknown role {role!r}; allowed roles are {sorted(allowed_roles)} "
                "(add it to train_roles to train it, or rename it)"
            )
        if not isinstance(content, str):
            raise ValueError(
                f"{where}, message {i} (role {role!r}): content must be a str, got {type(content).__name__}; "
                "render structured or multimodal content to text first"
            )
    if not any(message["role"] in train_roles for message in messages):
        roles = [message["role"] for message in messages]
        raise ValueError(
            f"{where}: no message has a trained role {list(train_roles)} (roles: {roles}); nothing would be "
            "trained. Drop the example or change train_roles"
        )
    return list(messages)


def render_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], chat_template_kwargs: Mapping[str, Any]
) -> str:
    """The conversation as the chat template renders it (a str, special tokens as text)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, **chat_template_kwargs)
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _sentinel(i: int) -> str:
    # Private-use characters: never in a template, untouched by `trim`.
    return f"\ue000{i}\ue001"


def _separators(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], chat_template_kwargs: Mapping[str, Any]
) -> list[str | None]:
    """The template text before each message's content, learned by rendering sentinel contents.

    ``separators[i]`` is the text between message ``i - 1``'s content (or the start) and message ``i``'s
    content: end-of-turn of ``i - 1`` + header of ``i`` (+ an injected system prompt before message 0).
    It pins each content to its exact position, so a short content ("a") is never found inside a
    header ("assistant"). ``None`` where the template does not render a message's content at all.
    """
    probe = [{**message, "content": _sentinel(i)} for i, message in enumerate(messages)]
    try:
        text = render_chat(tokenizer, probe, chat_template_kwargs)
    except Exception:
        # Content-dependent templates may reject the probe; plain forward search still works.
        return [None] * len(messages)
    separators: list[str | None] = []
    cursor = 0
    for i in range(len(messages)):
        start = text.find(_sentinel(i), cursor)
        if start < 0:
            separators.append(None)
            continue
        separators.append(text[cursor:start])
        cursor = start + len(_sentinel(i))
    return separators


def locate_contents(
    text: str,
    messages: Sequence[Mapping[str, Any]],
    separators: Sequence[str | None],
    train_roles: tuple[str, ...],
    example_index: int | None = None,
) -> list[tuple[int, int] | None]:
    """Character span ``(start, end)`` of every message's content in the rendered text, in order.

    Each content is first expected right after its separator; else searched forward from the end of
    the previous content (so assistant text repeating user text is not confused); else its stripped
    form (templates that ``trim``). A message the template does not render gets ``None`` unless its
    role is trained, which is an error.
    """
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for i, message in enumerate(messages):
        content: str = message["content"]
        separator = separators[i]
        span = None
        if separator is not None and text.startswith(separator, cursor):
            expected = cursor + len(separator)
            for candidate in (content, content.strip()):
                if text.startswith(candidate, expected):
                    span = (expected, expected + len(candidate))
                    break
        if span is None:
            for candidate in (content, content.strip()):
                start = text.find(candidate, cursor) if candidate else -1
                if start >= 0:
                    span = (start, start + len(candidate))
                    break
        if span is None:
            if message["role"] not in train_roles and (separator is None or not content.strip()):
                spans.append(None)  # not rendered (or empty) and not trained: nothing to mask or train
                continue
            raise ValueError(
                f"{_where(example_index)}, message {i} (role {message['role']!r}): its content cannot be "
                "found in the rendered chat template; the template rewrites or drops it. Normalize the "
                "content to what the template renders, pass a template that keeps it verbatim (set "
                "tokenizer.chat_template), or pre-tokenize the example as {'input_ids', 'labels'}"
            )
        spans.append(span)
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
    spans: Sequence[tuple[int, int] | None],
    markers: Sequence[str],
    *,
    train_roles: tuple[str, ...],
    train_end_of_turn: EndOfTurnMode,
    last_turn_only: bool,
    first_trainable: int = 0,
) -> list[tuple[int, int]]:
    """Sorted, disjoint character spans whose overlapping tokens are trained.

    Messages before ``first_trainable`` are context (a conversational prompt): never trained.
    """
    trainable = [
        i
        for i, m in enumerate(messages)
        if i >= first_trainable and m["role"] in train_roles and spans[i] is not None
    ]
    if last_turn_only:
        trainable = trainable[-1:]
    last_trained = trainable[-1] if trainable else None
    located = [i for i, span in enumerate(spans) if span is not None]
    trained: list[tuple[int, int]] = []
    for i in located:
        start, end = spans[i]
        next_starts = [spans[j][0] for j in located if j > i]
        limit = next_starts[0] if next_starts else len(text)
        is_trained = i in trainable
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


def _tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding.get("offset_mapping")
    # Slow tokenizers silently ignore return_offsets_mapping (or raise): fall back to prefix tokenization.
    return list(encoding["input_ids"]), [tuple(o) for o in offsets] if offsets is not None else None


def _labels_from_offsets(
    input_ids: list[int], offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]]
) -> list[int]:
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for t, (token_start, token_end) in enumerate(offsets):
        # Spans and tokens both advance left to right: skip spans that end before this token.
        while span_index < len(char_spans) and char_spans[span_index][1] <= token_start:
            span_index += 1
        for span_start, span_end in char_spans[span_index : span_index + 2]:
            if token_start < span_end and token_end > span_start:
                labels[t] = input_ids[t]
                break
    return labels


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _labels_by_prefix_tokenization(
    tokenizer: Any, text: str, input_ids: list[int], char_spans: list[tuple[int, int]]
) -> list[int]:
    """Labels for a tokenizer without offsets: tokenize the text up to each span boundary.

    Tokens of ``text[:b]`` that agree with the full tokenization end before ``b``; where they disagree
    a token straddles ``b`` and, as with offsets, a token overlapping a trained span is trained.
    """

    def encode(prefix: str) -> list[int]:
        return list(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    labels = [IGNORE_INDEX] * len(input_ids)
    for span_start, span_end in char_spans:
        first = _common_prefix_length(encode(text[:span_start]), input_ids)
        before_end = encode(text[:span_end])
        agreed = _common_prefix_length(before_end, input_ids)
        last = len(before_end) if agreed == len(before_end) else agreed + 1
        for t in range(first, min(last, len(input_ids))):
            labels[t] = input_ids[t]
    return labels


def _encode_once(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    train_roles: tuple[str, ...],
    train_end_of_turn: EndOfTurnMode,
    last_turn_only: bool,
    chat_template_kwargs: Mapping[str, Any],
    example_index: int | None,
    first_trainable: int = 0,
) -> tuple[list[int], list[int]]:
    text = render_chat(tokenizer, messages, chat_template_kwargs)
    separators = _separators(tokenizer, messages, chat_template_kwargs)
    spans = locate_contents(text, messages, separators, train_roles, example_index)
    char_spans = trained_char_spans(
        text,
        messages,
        spans,
        end_of_turn_markers(tokenizer),
        train_roles=train_roles,
        train_end_of_turn=train_end_of_turn,
        last_turn_only=last_turn_only,
        first_trainable=first_trainable,
    )
    input_ids, offsets = _tokenize_with_offsets(tokenizer, text)
    if offsets is not None:
        labels = _labels_from_offsets(input_ids, offsets, char_spans)
    else:
        labels = _labels_by_prefix_tokenization(tokenizer, text, input_ids, char_spans)
    return input_ids, labels


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


def encode_messages(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    train_roles: str | Sequence[str] = DEFAULT_TRAIN_ROLES,
    train_end_of_turn: EndOfTurnMode = DEFAULT_END_OF_TURN,
    last_turn_only: bool = False,
    max_length: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    example_index: int | None = None,
    context_messages: int = 0,
) -> dict[str, Any]:
    """Tokenize a conversation with its chat template and mask everything but the trained turns.

    Args:
        tokenizer: a tokenizer with a chat template (fast tokenizers use offsets; slow ones fall back to
            prefix tokenization).
        messages: ``[{"role": ..., "content": str}, ...]``; roles system, user, assistant, tool or any
            role in ``train_roles``. Extra keys are passed to the template untouched.
        train_roles: roles whose content is trained.
        train_end_of_turn: which end-of-turn markers are trained: ``"turn"`` after every trained
            message, ``"last"`` only after the last trained message, ``"all"`` after every message
            (untrained messages' content stays masked), ``"none"`` never.
        last_turn_only: train only the last message with a trained role (earlier ones are context).
        max_length: if the conversation is longer, drop the oldest exchanges (user turn up to the next
            user turn) while keeping leading system messages; if the last exchange alone is still too
            long, cut tokens from the right.
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.
        example_index: the example's index in its dataset, named in error messages.
        context_messages: the first ``context_messages`` messages are never trained, whatever their role
            (a conversational ``prompt`` followed by its ``completion`` messages).

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated_tokens": int, "dropped_turns": int,
        "truncated_completion": int}``: labels aligned with input_ids (``-100`` where not trained);
        ``truncated_tokens`` counts tokens cut from the right, ``dropped_turns`` the messages dropped
        from the left, ``truncated_completion`` is 1 when the right cut removed trained tokens.

    Example:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> encoded = encode_messages(tokenizer, [{"role": "user", "content": "Capital of France?"},
        ...                                       {"role": "assistant", "content": "Paris."}])  # doctest: +SKIP
        >>> tokenizer.decode([t for t in encoded["labels"] if t != -100])  # doctest: +SKIP
        'Paris.<|im_end|>'
    """
    roles = _normalize_train_roles(train_roles)
    if train_end_of_turn not in END_OF_TURN_MODES:
        raise ValueError(f"train_end_of_turn must be one of {END_OF_TURN_MODES}, got {train_end_of_turn!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    messages = validate_messages(messages, roles, example_index)
    options = dict(
        train_roles=roles,
        train_end_of_turn=train_end_of_turn,
        last_turn_only=last_turn_only,
        chat_template_kwargs=dict(chat_template_kwargs or {}),
        example_index=example_index,
    )
    input_ids, labels = _encode_once(tokenizer, messages, first_trainable=context_messages, **options)
    dropped_turns = 0
    if max_length is not None and len(input_ids) > max_length:
        n_system, starts = _exchanges(messages)
        # Drop the oldest exchanges one at a time (re-rendering: templates may depend on position),
        # keeping at least one exchange that still contains a trained message.
        for cut in starts[1:]:
            # Original message j >= cut is now at n_system + j - cut; the context boundary moves with it.
            first_trainable = (
                context_messages
                if context_messages <= n_system
                else max(n_system + context_messages - cut, n_system)
            )
            kept = list(messages[:n_system]) + list(messages[cut:])
            if not any(m["role"] in roles for m in kept[first_trainable:]):
                break
            input_ids, labels = _encode_once(tokenizer, kept, first_trainable=first_trainable, **options)
            dropped_turns = cut - n_system
            if len(input_ids) <= max_length:
                break
    truncated_tokens = 0
    truncated_completion = 0
    if max_length is not None and len(input_ids) > max_length:
        truncated_tokens = len(input_ids) - max_length
        truncated_completion = int(any(label != IGNORE_INDEX for label in labels[max_length:]))
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "truncated_tokens": truncated_tokens,
        "truncated_completion": truncated_completion,
        "dropped_turns": dropped_turns,
    }
