"""Per-token loss weightings: each trained token's loss times a weight computed from that loss, detached.

A weighting changes what each token contributes, never the normalization (the sum is still divided by
the trained tokens of the optimizer step), so it stays exact under gradient accumulation and data
parallelism. The eager loss applies it to its per-token losses, the fused kernel to each chunk's
losses and gradient rows (no second pass over the logits).

``"dft"`` (Dynamic Fine-Tuning, https://huggingface.co/papers/2508.05629, TRL's ``loss_type="dft"``):
``-log p(target) * p(target)`` with the probability detached, i.e. the cross-entropy ``l`` times
``exp(-l)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_shift_loss.options import LOSS_TYPES, check_choice

__all__ = ["TokenWeighting", "dft_weights", "token_weighting"]

TokenWeighting = Callable[[torch.Tensor], torch.Tensor]
"""``weights = weighting(token_losses)``: float32 ``[tokens]`` -> ``[tokens]``, computed without gradient."""


def dft_weights(token_losses: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning's weight of each token: its detached target probability ``exp(-cross_entropy)``.

    Examples:
        >>> dft_weights(torch.tensor([0.0, 0.6931471805599453]))
        tensor([1.0000, 0.5000])
    """
    return torch.exp(-token_losses.detach())


def token_weighting(
    loss_type: str, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> TokenWeighting | None:
    """The weighting of ``loss_type`` (None for the plain cross-entropy ``"nll"``).

    ``"dft"`` weights the plain cross-entropy by the target's probability; with label smoothing or a
    z-loss the per-token loss is no longer ``-log p(target)``, so the combination is refused.

    Examples:
        >>> token_weighting("nll") is None, token_weighting("dft") is dft_weights
        (True, True)
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if loss_type == "nll":
        return None
    if label_smoothing or z_loss:
        raise ValueError(
            f"loss_type='dft' weights each token's -log p(target) by p(target); with label_smoothing="
            f"{label_smoothing} and z_loss={z_loss} the token loss is not -log p(target): set both to 0"
        )
    return dft_weights
