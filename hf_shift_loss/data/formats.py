"""Row conversions between the accepted data formats, shared by the recipe and ``hf-shift-loss inspect``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["prompt_completion_to_messages"]


def prompt_completion_to_messages(row: Mapping[str, Any]) -> dict[str, Any]:
    """A string ``{"prompt", "completion"}`` row as a user/assistant conversation (other keys dropped).

    The chat template then renders it and chat masking trains the answer and its end-of-turn token.

    Examples:
        >>> prompt_completion_to_messages({"prompt": "2+2=", "completion": "4"})
        {'messages': [{'role': 'user', 'content': '2+2='}, {'role': 'assistant', 'content': '4'}]}
    """
    turns = (("user", row["prompt"]), ("assistant", row["completion"]))
    return {"messages": [{"role": role, "content": content} for role, content in turns]}
