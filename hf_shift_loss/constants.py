"""The facts both sides of the package share: the data side writes them into labels, the loss reads them.

``data/`` and ``loss/`` import this module and never each other (docs/architecture.md).
"""

from __future__ import annotations

__all__ = ["IGNORE_INDEX"]

IGNORE_INDEX = -100
"""The label of a position that is not trained (prompt, padding, the first token of a packed sequence).

The value ``torch.nn.functional.cross_entropy`` and transformers use, so labels made here work in any loss.
"""
