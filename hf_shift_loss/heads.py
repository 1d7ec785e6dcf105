"""Where the head detection was documented: now :mod:`hf_shift_loss.loss.heads`. This path keeps working."""

from hf_shift_loss.loss.heads import (
    LOGIT_SCALES,
    OutputHead,
    UnsupportedOutputHead,
    get_output_head,
    lm_head_returns_hidden_states,
)

__all__ = [
    "LOGIT_SCALES",
    "OutputHead",
    "UnsupportedOutputHead",
    "get_output_head",
    "lm_head_returns_hidden_states",
]
