"""What is logged about the predictions on the eager path, from the full logits ``[batch, seq, vocab]``:
correct argmax predictions and the entropy, over the trained positions (the fused kernel computes both
inside its chunks instead)."""

from __future__ import annotations

import torch

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.loss.eager import shift_labels

__all__ = ["count_correct_tokens", "sum_token_entropy"]

# The float32 values one chunk of the eager entropy holds (64 MiB): a few thousand rows of a 32k vocabulary.
ENTROPY_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def sum_token_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Sum over trained positions of the entropy of the predicted distribution (0-dim float32).

    Divided by the trained tokens it is TRL's logged ``entropy``. One more pass over ``logits``
    ``[batch, seq, vocab]`` (the fused loss computes it inside its chunks instead), in row chunks of at
    most :data:`ENTROPY_CHUNK_ELEMENTS` float32 values, so that its temporaries never add the size of the
    full logits again; no host sync.

    Examples:
        >>> print(f"{sum_token_entropy(torch.zeros(1, 3, 4), torch.tensor([[-100, 1, 2]])):.4f}")  # 2 x log(4)
        2.7726
    """
    labels = labels.to(logits.device)
    targets = shift_labels(labels, ignore_index) if shift else labels
    vocab_size = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab_size)
    trained = (targets != ignore_index).reshape(-1)
    rows_per_chunk = max(1, ENTROPY_CHUNK_ELEMENTS // vocab_size)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, flat_logits.shape[0], rows_per_chunk):
        log_probs = torch.log_softmax(flat_logits[start : start + rows_per_chunk].float(), dim=-1)
        entropies = -(log_probs.exp() * log_probs).sum(dim=-1)
        total += (entropies * trained[start : start + rows_per_chunk]).sum()
    return total


@torch.no_grad()
def count_correct_tokens(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Trained positions whose argmax prediction equals the target (0-dim int64 tensor).

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` with the same convention as :func:`causal_lm_loss`.
    """
    labels = labels.to(logits.device)
    targets = shift_labels(labels, ignore_index) if shift else labels
    predictions = logits.argmax(dim=-1)
    return ((predictions == targets) & (targets != ignore_index)).sum()
