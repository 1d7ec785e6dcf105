"""The loss side: labels ``[batch, seq]`` -> one shift -> float32 cross-entropy -> one normalization.

The pipeline, from a model to its loss (one way, whatever the strategy):
:func:`choose_loss_path` (once per model: :class:`EagerLoss` or :class:`FusedLoss`, with the reason) ->
``path(model, inputs_without_labels, labels)`` -> :class:`LossResult`.

- ``paths.py``: the loss paths, the one way to run the loss on a model; the fused path owns the head.
- ``heads.py``: a model's linear head (weight, bias, logit scale, soft-cap) or the reason it has none;
  the lm_head made the identity for one forward.
- ``eager.py``: :func:`causal_lm_loss` on full logits ``[batch, seq, vocab]``, and the shared pieces
  (the shift, validation, counts, the reduction); ``predictions.py``: correct argmax predictions and the
  entropy from full logits (what the eager path logs).
- ``fused.py``: :func:`fused_linear_cross_entropy` on hidden states ``[batch, seq, hidden]`` and the head
  weight: validation, the shift, selecting the trained rows, the chunk size, the reduction.
- ``kernel.py``: the chunked lm_head + cross-entropy ``torch.autograd.Function`` under it.
- ``weighting.py``: per-token loss weightings (``loss_type="dft"``), applied by both losses.

The ignore index comes from :mod:`hf_shift_loss.constants`, which the data side imports too; this
package imports neither the data side nor the trainer (docs/architecture.md).
"""

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.loss.eager import (
    TokenLoss,
    apply_token_loss,
    causal_lm_loss,
    count_trained_tokens,
    prepare_loss_weights,
    reduce_token_losses,
    shift_labels,
    validate_labels,
)
from hf_shift_loss.loss.fused import default_chunk_size, fused_linear_cross_entropy
from hf_shift_loss.loss.heads import OutputHead, UnsupportedOutputHead, get_output_head
from hf_shift_loss.loss.paths import (
    EagerLoss,
    FusedLoss,
    LogitsNotComputedError,
    LossResult,
    choose_loss_path,
)
from hf_shift_loss.loss.predictions import count_correct_tokens

__all__ = [
    "IGNORE_INDEX",
    "EagerLoss",
    "FusedLoss",
    "LogitsNotComputedError",
    "LossResult",
    "OutputHead",
    "TokenLoss",
    "UnsupportedOutputHead",
    "apply_token_loss",
    "causal_lm_loss",
    "choose_loss_path",
    "count_correct_tokens",
    "count_trained_tokens",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "get_output_head",
    "prepare_loss_weights",
    "reduce_token_losses",
    "shift_labels",
    "validate_labels",
]
