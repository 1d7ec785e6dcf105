"""hf_shift_loss: the causal-LM fine-tuning loss, correct, fast and visible.

Public API (stable; see docs/api.md):

- :func:`causal_lm_loss` (loss.py): shift on labels, flatten, float32 cross-entropy, reductions.
- :func:`fused_linear_cross_entropy` (fused.py): the same loss from hidden states and the lm_head weight,
  in chunks of trained tokens, without the full logits.
- :func:`encode_messages` (chat.py): assistant-only masking for any chat template.
- :func:`inspect_dataset` (inspector.py): what will be trained, token by token, with statistics.
- :class:`PromptMaskingCollator` (collator.py): examples to masked, padded batches.
- :class:`ShiftLossTrainer`, :class:`ShiftLossArguments` (trainer.py): the Trainer wiring.
"""

from hf_shift_loss.chat import encode_messages
from hf_shift_loss.collator import CollatorStats, PromptMaskingCollator
from hf_shift_loss.fused import fused_linear_cross_entropy, fused_linear_cross_entropy_with_accuracy
from hf_shift_loss.inspector import InspectionReport, inspect_dataset
from hf_shift_loss.loss import IGNORE_INDEX, causal_lm_loss, count_trained_tokens, shift_labels
from hf_shift_loss.packing import pack_examples
from hf_shift_loss.trainer import ShiftLossArguments, ShiftLossTrainer

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "CollatorStats",
    "InspectionReport",
    "PromptMaskingCollator",
    "ShiftLossArguments",
    "ShiftLossTrainer",
    "causal_lm_loss",
    "count_trained_tokens",
    "encode_messages",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_with_accuracy",
    "inspect_dataset",
    "pack_examples",
    "shift_labels",
]
