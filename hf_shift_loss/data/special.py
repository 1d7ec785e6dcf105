"""Special-token strings inside content (``"<|im_start|>"`` typed in a user message or an answer).

Tokenizers read such a string as the control token itself (``apply_chat_template`` does too), so text
that merely mentions a control token becomes one, and in ``text`` and completion rows a *trained*
one. Every row that holds one is counted (``data/special_tokens_in_content``); with
``split_special_tokens=True`` the content of text and prompt/completion rows is tokenized as plain text
(transformers' ``split_special_tokens``), while the tokens the encoder adds itself (BOS, EOS) stay
special.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["content_strings", "has_special_tokens", "special_token_strings"]


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """The strings ``tokenizer`` reads as special tokens (its special tokens and added special tokens).

    Examples:
        >>> class Tok:
        ...     all_special_tokens = ["</s>"]
        ...     added_tokens_decoder = {}
        >>> special_token_strings(Tok())
        ('</s>',)
    """
    return _special_token_strings(id(tokenizer), tokenizer)


@functools.lru_cache(maxsize=8)
def _special_token_strings(_key: int, tokenizer: Any) -> tuple[str, ...]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    strings |= {token.content for token in added.values() if getattr(token, "special", False)}
    return tuple(sorted(string for string in strings if string))


def content_strings(example: Mapping[str, Any]) -> Iterator[str]:
    """Every piece of content a row brings (``text``, string ``prompt``/``completion``, message contents
    and their text parts), not the template's own text.

    Examples:
        >>> list(content_strings({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}))
        ['a']
    """
    for key in ("text", "prompt", "completion", "messages"):
        value = example.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for message in value:
                content = message.get("content") if isinstance(message, Mapping) else None
                if isinstance(content, str):
                    yield content
                elif isinstance(content, list):
                    yield from (
                        part["text"] for part in content if isinstance(part, Mapping) and "text" in part
                    )


def has_special_tokens(example: Mapping[str, Any], specials: tuple[str, ...]) -> bool:
    """Whether any content of the row holds one of the ``specials`` strings."""
    return any(special in text for text in content_strings(example) for special in specials)
