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

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from hf_shift_loss.data.chat_labels import _encode, _encode_many
from hf_shift_loss.data.chat_render import (
    DEFAULT_END_OF_TURN,
    DEFAULT_TRAIN_ROLES,
    STANDARD_ROLES,
    _normalize_train_roles,
    validate_messages,
)
from hf_shift_loss.data.chat_truncate import _fit, _fit_many
from hf_shift_loss.options import END_OF_TURN_MODES, TRAIN_ON, EndOfTurnMode, TrainOn, check_choice

__all__ = ["encode_conversations", "encode_messages", "STANDARD_ROLES"]


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
    Only conversations longer than ``max_length`` are rendered again (:func:`_drop_oldest_exchanges`),
    their searches advanced together: each round's kept parts are tokenized in one call too.

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
    requests = []
    for messages, index, context in zip(conversations, indices, contexts, strict=True):
        options = dict(
            train_roles=roles,
            train_end_of_turn=train_end_of_turn,
            last_turn_only=train_on == "last_turn",
            chat_template_kwargs=kwargs,
            example_index=index,
            cache=cache,
        )
        requests.append((validate_messages(messages, index), context, options))
    encoded = _encode_many(tokenizer, requests)
    items = [
        (messages, full, context, options)
        for (messages, context, options), full in zip(requests, encoded, strict=True)
    ]
    return _fit_many(tokenizer, items, max_length, train_on, lambda round_: _encode_many(tokenizer, round_))


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
