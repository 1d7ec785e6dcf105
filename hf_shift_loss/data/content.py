"""What one chat row brings to its template besides the messages: per-row ``tools`` and
``chat_template_kwargs``, and structured content (``[{"type": "text", "text": ...}]``) as text.

:func:`row_template_kwargs` merges the run's ``chat_template_kwargs`` under the row's own (TRL's
``tools`` and ``chat_template_kwargs`` columns). :func:`text_content` turns structured content into the
string the template renders the same way, so the chat masking (which locates each content string in
the rendered text) trains exactly the tokens of the equivalent string content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from hf_shift_loss.data.chat_render import render_chat

__all__ = ["row_template_kwargs", "text_content"]


def row_template_kwargs(
    example: Mapping[str, Any], chat_template_kwargs: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """``chat_template_kwargs`` for one row: the run's, then the row's ``tools``, then its own kwargs.

    ``tools`` is a list of JSON function schemas or a JSON string of one (as TRL reads it); the row's
    ``chat_template_kwargs`` (a dict, e.g. ``{"enable_thinking": False}``) win over both.

    Examples:
        >>> row_template_kwargs({"tools": '[{"name": "add"}]', "chat_template_kwargs": {"enable_thinking": False}},
        ...                     {"enable_thinking": True, "date": "today"}, "row 0")
        {'enable_thinking': False, 'date': 'today', 'tools': [{'name': 'add'}]}
    """
    merged = dict(chat_template_kwargs)
    tools = example.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{where}: 'tools' is a string but not JSON ({error}); give a list of schemas"
            ) from None
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
            raise ValueError(
                f"{where}: 'tools' must be a list of JSON function schemas (or a JSON string of one), got "
                f"{str(tools)[:80]!r}"
            )
        merged["tools"] = tools
    row_kwargs = example.get("chat_template_kwargs")
    if row_kwargs is not None:
        if not isinstance(row_kwargs, Mapping):
            raise ValueError(
                f"{where}: 'chat_template_kwargs' must be a dict of apply_chat_template arguments, got "
                f"{type(row_kwargs).__name__}"
            )
        merged.update({key: value for key, value in row_kwargs.items() if value is not None})
    return merged


def _is_structured(content: Any) -> bool:
    return isinstance(content, list | tuple)


def _joined_text(content: Sequence[Any], where: str, i: int) -> str:
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"{where}, message {i}: content part of type {kind!r}; only text parts "
                "([{'type': 'text', 'text': ...}]) are supported: multimodal SFT (images, audio) is not "
                "supported yet"
            )
        texts.append(part["text"])
    return "".join(texts)


def text_content(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    chat_template_kwargs: Mapping[str, Any],
    example_index: int | None = None,
) -> list[Mapping[str, Any]]:
    """``messages`` with every structured content replaced by its text parts joined.

    Templates that iterate over the parts render the joined string as they render the parts (checked
    on this row: both are rendered); templates that expect a string would print the list's repr, and
    render the joined string instead (what the content means). A template that renders the parts
    otherwise than their joined text (separators of its own) is refused. Non-text parts raise a
    ValueError: multimodal SFT is not supported yet. Rows without structured content come back as
    they are.

    Examples:
        >>> text_content(None, [{"role": "user", "content": "hi"}], {})
        [{'role': 'user', 'content': 'hi'}]
    """
    if not isinstance(messages, list | tuple) or not any(
        isinstance(message, Mapping) and _is_structured(message.get("content")) for message in messages
    ):
        return messages
    where = f"row {example_index}" if example_index is not None else "conversation"
    joined = [
        {**message, "content": _joined_text(message["content"], where, i)}
        if isinstance(message, Mapping) and _is_structured(message.get("content"))
        else message
        for i, message in enumerate(messages)
    ]
    as_parts = _render_or_none(tokenizer, messages, chat_template_kwargs)
    as_text = render_chat(tokenizer, joined, chat_template_kwargs, example_index)
    if as_parts is None or as_parts == as_text or "'type': 'text'" in as_parts:
        return joined  # the same render, or a string template that would print the list
    raise ValueError(
        f"{where}: the chat template renders structured content differently from its text parts joined, so "
        "the trained tokens cannot be located; give each message's content as one string"
    )


def _render_or_none(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], chat_template_kwargs: Mapping[str, Any]
) -> str | None:
    try:
        return render_chat(tokenizer, messages, chat_template_kwargs)
    except ValueError:  # a template that cannot render parts at all: the joined text is what it takes
        return None
