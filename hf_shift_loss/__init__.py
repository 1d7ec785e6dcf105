"""hf_shift_loss: the causal-LM fine-tuning loss, correct, fast and visible.

Public API (stable; see docs/api.md):

- :func:`causal_lm_loss` (loss.py): shift on labels, flatten, float32 cross-entropy, reductions.
- :class:`PromptMaskingCollator` (collator.py): examples to masked, padded batches.
- :class:`ShiftLossTrainer`, :class:`ShiftLossArguments` (trainer.py): the Trainer wiring.
"""

from hf_shift_loss.collator import CollatorStats, PromptMaskingCollator
from hf_shift_loss.loss import IGNORE_INDEX, causal_lm_loss, count_trained_tokens, shift_labels
from hf_shift_loss.trainer import ShiftLossArguments, ShiftLossTrainer

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "CollatorStats",
    "PromptMaskingCollator",
    "ShiftLossArguments",
    "ShiftLossTrainer",
    "causal_lm_loss",
    "count_trained_tokens",
    "shift_labels",
]
