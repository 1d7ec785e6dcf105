"""What is logged about the predictions on the eager path, from the full logits ``[batch, seq, vocab]``:
correct argmax predictions and the entropy, over the trained positions (the fused kernel computes both
inside its chunks instead)."""

from __future__ import annotations

import torch

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.loss.eager import shift_labels

__all__ = ["count_correct_tokens", "sum_token_entropy"]


@torch.no_grad()
def sum_token_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Sum over trained positions of the entropy of the predicted distribution (0-dim float32).

    Divided by the trained tokens it is TRL's logged ``entropy``. One float32 pass over ``logits``
    ``[batch, seq, vocab]`` (the fused loss computes it inside its chunks instead).

    Examples:
        >>> print(f"{sum_token_entropy(torch.zeros(1, 3, 4), torch.tensor([[-100, 1, 2]])):.4f}")  # 2 x log(4)
        2.7726
    """
    labels = labels.to(logits.device)
    targets = shift_labels(labels, ignore_index) if shift else labels
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    entropies = -(log_probs.exp() * log_probs).sum(dim=-1)
    return (entropies * (targets != ignore_index)).sum()


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
