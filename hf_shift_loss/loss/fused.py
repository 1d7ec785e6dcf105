"""Fused lm_head + cross-entropy: the causal-LM loss without materializing the logits.

``fused_linear_cross_entropy(hidden, weight, labels)`` has exactly the meaning of
``causal_lm_loss(hidden @ weight.T, labels)`` (same label convention, shift, reductions,
``num_items_in_batch``, label smoothing, z-loss, float32 math), but only the *trained* positions are
projected: after the shift, the rows of ``hidden`` whose target is not ``ignore_index`` are selected, so
prompt tokens and padding cost no FLOPs at all. The selected rows go to the chunked kernel
(:mod:`hf_shift_loss.loss.kernel`), which never holds more than one chunk of logits.

This module is the entry: validation, the shift, the row selection, the chunk size, the reduction.
See docs/fused-loss.md for the memory and FLOP math.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.loss.eager import (
    Reduction,
    _check_reduction,
    check_labels_shape,
    logit_transform,
    prepare_loss_weights,
    reduce_token_losses,
    shift_labels,
    validate_labels,
)
from hf_shift_loss.loss.kernel import ChunkedLinearCrossEntropy
from hf_shift_loss.loss.weighting import token_weighting
from hf_shift_loss.options import LossType, check_chunk_size

__all__ = [
    "fused_linear_cross_entropy",
    "default_chunk_size",
]

# One chunk's float32 logits stay under 256 MiB and under a share of the size of the float32 weight
# gradient ([vocab, hidden]): half of it when the head trains (that gradient then exists anyway, so the
# chunk stays smaller than memory every implementation allocates), a quarter when the head is frozen (no
# weight gradient exists; the chunk is then most of what the loss costs). Not much smaller: every chunk
# streams the weight twice and the float32 weight gradient once in and out, so thin chunks are slow
# matmuls. Forward+backward CPU time, float32, trainable head: 4096 x 1024 x 32k, 50% masked: 4.7 s with
# 256-row chunks (a quarter), 4.35 s with 512 (half), 4.27 s with 1024; 512 x 256 x 128k: 1.6 s with 64
# rows, 1.45 s with 128, 1.34 s with 256.
CHUNK_LOGITS_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 64


def default_chunk_size(num_rows: int, vocab_size: int, hidden_size: int, trainable_head: bool = True) -> int:
    """Rows per chunk from the memory budget above, spread evenly over the chunks.

    E.g. 300 rows with a 256-row budget become two chunks of 150, so that the last chunk is not a tiny,
    slow matmul.

    Examples:
        >>> default_chunk_size(4096, 32000, 1024), default_chunk_size(4096, 32000, 1024, trainable_head=False)
        (512, 256)
    """
    weight_grad_bytes = 4 * vocab_size * hidden_size
    budget_bytes = min(CHUNK_LOGITS_BYTES, weight_grad_bytes // (2 if trainable_head else 4))
    budget_rows = max(MIN_CHUNK_ROWS, budget_bytes // (4 * vocab_size))
    if num_rows <= budget_rows:
        return max(num_rows, 1)
    num_chunks = -(-num_rows // budget_rows)
    return -(-num_rows // num_chunks)


def _validate_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"hidden must be [batch, seq, hidden] or [tokens, hidden], got shape {tuple(hidden.shape)}"
        )
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [vocab, hidden] with hidden={hidden.shape[-1]} (the last dimension of hidden "
            f"shaped {tuple(hidden.shape)}), got shape {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype, as for lm_head(hidden)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [vocab] = ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    check_labels_shape(labels, hidden, "hidden", "hidden")


@overload
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    shift: bool = ...,
    ignore_index: int = ...,
    reduction: Reduction = ...,
    num_items_in_batch: torch.Tensor | int | float | None = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    logit_scale: float = ...,
    logit_softcap: float | None = ...,
    loss_weights: torch.Tensor | None = ...,
    chunk_size: int | None = ...,
    return_correct: Literal[False] = ...,
    sync_free: bool = ...,
    loss_type: LossType = ...,
    return_entropy: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    shift: bool = ...,
    ignore_index: int = ...,
    reduction: Reduction = ...,
    num_items_in_batch: torch.Tensor | int | float | None = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    logit_scale: float = ...,
    logit_softcap: float | None = ...,
    loss_weights: torch.Tensor | None = ...,
    chunk_size: int | None = ...,
    return_correct: Literal[True],
    sync_free: bool = ...,
    loss_type: LossType = ...,
    return_entropy: Literal[False] = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = ...,
    shift: bool = ...,
    ignore_index: int = ...,
    reduction: Reduction = ...,
    num_items_in_batch: torch.Tensor | int | float | None = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    logit_scale: float = ...,
    logit_softcap: float | None = ...,
    loss_weights: torch.Tensor | None = ...,
    chunk_size: int | None = ...,
    return_correct: bool,
    sync_free: bool = ...,
    loss_type: LossType = ...,
    return_entropy: bool = ...,
) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    num_items_in_batch: torch.Tensor | int | float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    loss_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_correct: bool = False,
    sync_free: bool = False,
    loss_type: LossType = "nll",
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``causal_lm_loss(hidden @ weight.T + bias, labels, ...)`` without materializing the logits.

    Args:
        hidden: ``[batch, seq, hidden]`` (or ``[tokens, hidden]``) last hidden states, float32/bfloat16/
            float16; the logsumexp, losses and weight-gradient accumulation run in float32.
        weight: ``[vocab, hidden]``, the ``lm_head`` weight (same dtype as ``hidden``). When
            ``weight.requires_grad`` is False (frozen head) no weight gradient is computed.
        labels: ``[batch, seq]`` (``hidden.shape[:-1]``), same convention as :func:`causal_lm_loss`.
            Moved to ``hidden``'s device.
        bias: optional ``[vocab]`` lm_head bias.
        shift, ignore_index, reduction, num_items_in_batch, label_smoothing, z_loss, logit_scale,
            logit_softcap, loss_type, loss_weights: exactly as :func:`hf_shift_loss.loss.causal_lm_loss`
            (``"none"`` returns ``labels``' shape, 0 where not trained); the scale and soft-cap are applied
            to each chunk's logits, with their exact gradient; the weights scale each chunk's losses and
            their gradient row by row (the trained rows' weights are selected with the rows).
        chunk_size: trained rows per chunk; default :func:`default_chunk_size` (float32 logits of a chunk
            under min(256 MiB, half the float32 weight gradient's size; a quarter with a frozen head)).
        return_correct: also return the number of trained positions whose argmax over the logits equals
            the target, counted chunk by chunk while the logits exist (no extra matmul).
        return_entropy: also return the sum over trained positions of the entropy of the predicted
            distribution (float32 0-dim; divided by the trained tokens it is TRL's logged ``entropy``),
            computed chunk by chunk from the chunk's softmax (no extra matmul, no second pass over the
            logits). It comes last in the returned tuple.
        sync_free: process every position (fixed shapes, chunks of ``chunk_size`` positions), the untrained
            ones masked inside the kernel (a loss of exactly 0 and zero gradients), with no host sync and
            no data-dependent shape or Python branch: the mode for ``torch.compile(fullgraph=True)`` and
            CUDA graphs. The results equal the default mode's (up to float summation order). The price:
            untrained positions cost the FLOPs of trained ones, and labels are not validated: a label
            outside ``[0, vocab)`` that is not ``ignore_index`` is NOT reported, it is treated as
            ``ignore_index`` (no loss, no gradient, not counted by ``"mean"`` nor by ``return_correct``);
            ``loss_weights`` are not checked for finite values either.

    Returns:
        The loss: a float32 scalar (``"mean"``, ``"sum"``) or a float32 tensor shaped like ``labels``
        (``"none"``). With no trained token the loss is 0 with zero gradients, never NaN.
        With ``return_correct=True``, ``(loss, correct_tokens)``: ``correct_tokens`` is a 0-dim int64
        tensor, the same count as ``loss.count_correct_tokens(hidden @ weight.T, labels)``.

    Raises:
        ValueError: shapes or dtypes do not match, a label is outside ``[0, vocab)`` and is not
            ``ignore_index`` (not checked with ``sync_free=True``), or an option is out of range.

    Host syncs: validating the labels (one ``.any()``, as ``causal_lm_loss``) and selecting the trained
    rows (``nonzero`` needs their count to size the chunks): two small syncs per call (the first also checks
    that ``loss_weights`` are finite), the price of skipping untrained positions entirely. ``sync_free=True`` has none (all checks then are on shapes,
    dtypes and options, known without reading a tensor).

    Examples:
        One sequence of 4 positions, hidden size 2, vocabulary 3; the first two tokens are the prompt,
        so positions 1 and 2 are trained (to predict tokens 1 and 2; the argmax gets the first right):

        >>> import torch
        >>> from hf_shift_loss.loss import causal_lm_loss, fused_linear_cross_entropy
        >>> hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.5], [0.5, -1.0]]], requires_grad=True)
        >>> weight = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, -1.0]], requires_grad=True)
        >>> labels = torch.tensor([[-100, -100, 1, 2]])
        >>> loss = fused_linear_cross_entropy(hidden, weight, labels)
        >>> print(f"{loss.item():.4f}")
        1.0671
        >>> bool(torch.allclose(loss, causal_lm_loss(hidden @ weight.T, labels)))
        True
        >>> loss, correct_tokens = fused_linear_cross_entropy(hidden, weight, labels, return_correct=True)
        >>> print(f"{loss.item():.4f}", correct_tokens)
        1.0671 tensor(1)
        >>> loss.backward()
        >>> hidden.grad.shape
        torch.Size([1, 4, 2])

        The sync-free mode gives the same loss and gradients, computed over all 4 positions:

        >>> hidden_grad = hidden.grad.clone()
        >>> hidden.grad = None
        >>> loss = fused_linear_cross_entropy(hidden, weight, labels, sync_free=True)
        >>> print(f"{loss.item():.4f}")
        1.0671
        >>> loss.backward()
        >>> bool(torch.allclose(hidden.grad, hidden_grad))
        True
    """
    _check_reduction(reduction, label_smoothing, z_loss)
    weighting = token_weighting(loss_type, label_smoothing=label_smoothing, z_loss=z_loss)
    transform = logit_transform(logit_scale, logit_softcap)
    _validate_inputs(hidden, weight, labels, bias)
    check_chunk_size(chunk_size)
    vocab_size, hidden_size = weight.shape

    # Model parallelism: the batch may live on another device than the lm_head's input.
    labels = labels.to(device=hidden.device, dtype=torch.long)
    targets = shift_labels(labels, ignore_index) if shift else labels
    grad_enabled = torch.is_grad_enabled()
    needs_grad = (
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    flat_targets = targets.reshape(-1)
    flat_weights = (
        None
        if loss_weights is None
        else prepare_loss_weights(
            loss_weights, labels, shift=shift, device=hidden.device, validate=False
        ).reshape(-1)
    )
    kernel_weights = None
    if sync_free:
        # Every position, masked inside the kernel: shapes depend only on the input shapes and the options,
        # never on the labels' values (no nonzero, no .any(), no .item()). A position is trained when its
        # target is in [0, vocab) and not ignore_index; its gather index is clamped to 0 otherwise.
        trained = (flat_targets != ignore_index) & (flat_targets >= 0) & (flat_targets < vocab_size)
        rows, kernel_mask = None, trained
        kernel_targets = torch.where(trained, flat_targets, torch.zeros_like(flat_targets))
        if flat_weights is not None:  # an untrained row's weight (even inf or NaN, unchecked here) reads 0
            kernel_weights = torch.where(trained, flat_weights, torch.zeros_like(flat_weights))
    else:
        validate_labels(targets, vocab_size, ignore_index, loss_weights)  # one sync: labels and weights
        trained = flat_targets != ignore_index
        # The one unavoidable sync of skipping untrained rows: the number of trained rows sizes the chunks.
        rows, kernel_mask = trained.nonzero().squeeze(1), None
        kernel_targets = flat_targets.index_select(0, rows)
        kernel_weights = None if flat_weights is None else flat_weights.index_select(0, rows)
    if chunk_size is None:
        chunk_size = default_chunk_size(
            kernel_targets.shape[0], vocab_size, hidden_size, weight.requires_grad
        )

    per_token = reduction == "none"
    loss, correct_tokens, entropy_sum = ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden_size),
        weight,
        bias,
        rows,
        kernel_targets,
        kernel_mask,
        kernel_weights,
        chunk_size,
        float(label_smoothing),
        float(z_loss),
        transform,
        per_token,
        return_correct,
        needs_grad,
        weighting,
        return_entropy,
    )
    if per_token and rows is not None:  # the trained rows' losses at their positions, 0 elsewhere
        token_losses = torch.zeros(flat_targets.shape[0], dtype=torch.float32, device=hidden.device)
        loss = token_losses.index_copy(0, rows, loss)
    if per_token:
        loss = loss.view(targets.shape)
    else:
        loss = reduce_token_losses(loss, trained, reduction, num_items_in_batch)
    extras = (correct_tokens,) * return_correct + (entropy_sum,) * return_entropy
    return (loss, *extras) if extras else loss
