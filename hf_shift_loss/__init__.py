"""hf_shift_loss: the causal-LM fine-tuning loss, correct, fast and visible.

The public API (docs/api.md lists exactly these names):

- :class:`ShiftLossTrainer`, :class:`ShiftLossArguments`: the Trainer, its data and loss options.
- :func:`causal_lm_loss`, :func:`fused_linear_cross_entropy`, :data:`IGNORE_INDEX`: the loss.
- :class:`PromptMaskingCollator`: examples to masked, padded batches, for your own loops.
- :func:`prepare_dataset`, :class:`DataStats`, :func:`encode_messages`: the data path and its counts.
- :func:`inspect_dataset`: what will be trained, token by token (imported on first use).

Everything else is importable from its package (``hf_shift_loss.data``, ``hf_shift_loss.loss``, ...);
docs/architecture.md maps the package's rooms.
"""

from typing import Any

from hf_shift_loss.collator import PromptMaskingCollator
from hf_shift_loss.config import ShiftLossArguments
from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.data import DataStats, encode_messages, prepare_dataset
from hf_shift_loss.loss import causal_lm_loss, fused_linear_cross_entropy
from hf_shift_loss.trainer import ShiftLossTrainer

__version__ = "0.2.0"

__all__ = [
    "IGNORE_INDEX",
    "DataStats",
    "PromptMaskingCollator",
    "ShiftLossArguments",
    "ShiftLossTrainer",
    "causal_lm_loss",
    "encode_messages",
    "fused_linear_cross_entropy",
    "inspect_dataset",
    "prepare_dataset",
]


def __getattr__(name: str) -> Any:
    # The inspector needs rich (and matplotlib for its histogram): imported only when asked for.
    if name == "inspect_dataset":
        from hf_shift_loss.inspector import inspect_dataset

        return inspect_dataset
    raise AttributeError(f"module 'hf_shift_loss' has no attribute {name!r}")
