"""hf_shift_loss: the causal-LM fine-tuning loss, correct, fast and visible."""

from hf_shift_loss.loss import IGNORE_INDEX, causal_lm_loss

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
]
