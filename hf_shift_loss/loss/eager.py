"""The causal-LM loss: one shift, flatten, cross-entropy, one normalization.

Label convention (see docs/concepts.md): ``labels[b, t]`` is the token at position ``t`` (aligned with
``input_ids``) or ``ignore_index`` where position ``t`` is not trained. The logits at position ``t``
predict the token at ``t + 1``, so the loss pairs ``logits[b, t]`` with ``labels[b, t + 1]``.

The shift is applied to the *labels* (pad one ``ignore_index`` column on the right, drop the first
column), never to the logits: ``logits[..., :-1, :].contiguous()`` copies the largest tensor of the
training step, while shifting the labels copies a ``[batch, seq]`` integer tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.loss.weighting import token_weighting
from hf_shift_loss.options import REDUCTIONS, LossType, Reduction, check_choice, check_loss_options

TokenLoss = Callable[[torch.Tensor], torch.Tensor]
"""A per-token loss: float32 ``[trained]`` losses in, ``[trained]`` values to sum and normalize out."""

__all__ = [
    "IGNORE_INDEX",
    "TokenLoss",
    "apply_token_loss",
    "causal_lm_loss",
    "shift_labels",
    "count_trained_tokens",
    "prepare_loss_weights",
    "reduce_token_losses",
    "validate_labels",
]


class LogitTransform(NamedTuple):
    """What a model does to ``lm_head(hidden)`` before the loss: ``softcap(scale * logits)``."""

    scale: float = 1.0
    softcap: float | None = None


def logit_transform(logit_scale: float = 1.0, logit_softcap: float | None = None) -> LogitTransform:
    """Validated :class:`LogitTransform` (a positive finite scale, a positive cap or None)."""
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale}")
    if logit_softcap is not None and not (math.isfinite(logit_softcap) and logit_softcap > 0):
        raise ValueError(f"logit_softcap must be a positive finite number or None, got {logit_softcap}")
    return LogitTransform(float(logit_scale), None if logit_softcap is None else float(logit_softcap))


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Return the next-token targets aligned with the logits: ``out[..., t] = labels[..., t + 1]``.

    Args:
        labels: ``[batch, seq]`` (or ``[seq]``) integer labels aligned with ``input_ids``.

    Returns:
        A tensor of the same shape; the last column is ``ignore_index`` (the last position has no
        next token to predict).
    """
    return _shift(labels, ignore_index)


def _shift(values: torch.Tensor, fill: float) -> torch.Tensor:
    """``out[..., t] = values[..., t + 1]``, the last column ``fill``: the one shift of labels and weights."""
    return F.pad(values, (0, 1), value=fill)[..., 1:]


def prepare_loss_weights(
    loss_weights: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    device: torch.device | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """``loss_weights`` as the loss applies them: float32, detached, shifted exactly like ``labels``.

    Args:
        loss_weights: ``[batch, seq]`` (``labels``' shape), any real dtype: the weight of each position's
            trained token, aligned with ``labels`` (a weight at an untrained position is never read).
        labels: the labels they go with (only their shape is read).
        shift: shift the weights as the loss shifts the labels (``out[..., t] = weights[..., t + 1]``, 0 in
            the last column), so that a weight stays with its token.
        device: where the loss runs (the logits' or hidden states' device).
        validate: check that every weight is finite (one host sync), naming the first that is not. The
            losses pass False and let :func:`validate_labels` check the weights in the labels' sync.

    Returns:
        float32 ``[batch, seq]`` weights aligned with the shifted targets, without gradient (weights are
        data, not parameters).

    Raises:
        ValueError: the shape differs from ``labels``'; the dtype is not real; a weight is not finite.
    """
    if not torch.is_tensor(loss_weights):
        loss_weights = torch.as_tensor(loss_weights)
    if loss_weights.is_complex() or loss_weights.dtype == torch.bool:
        raise ValueError(
            f"loss_weights must be real numbers (a float per token), got {loss_weights.dtype}; convert them "
            "with loss_weights.float()"
        )
    if tuple(loss_weights.shape) != tuple(labels.shape):
        raise ValueError(
            f"loss_weights shape {tuple(loss_weights.shape)} does not match labels shape {tuple(labels.shape)}; "
            "give one weight per token, aligned with labels (and input_ids) exactly like labels: the loss "
            "shifts both"
        )
    weights = loss_weights.detach().to(device=device, dtype=torch.float32)
    if validate:
        nonfinite = ~torch.isfinite(weights)
        if bool(nonfinite.any()):
            raise _nonfinite_weight_error(weights, nonfinite)
    return _shift(weights, 0.0) if shift else weights


def _nonfinite_weight_error(weights: torch.Tensor, nonfinite: torch.Tensor) -> ValueError:
    """The error naming the first weight that is not finite (``nonfinite``: where, ``weights``' shape)."""
    index = tuple(int(i) for i in nonfinite.nonzero()[0].tolist())
    where = f"row {index[0]}, position {index[1]}" if len(index) == 2 else f"index {index}"
    return ValueError(
        f"loss_weights at {where} is {float(weights[index])} (loss_weights shaped "
        f"{tuple(weights.shape)}, aligned with labels): every weight must be a finite number; "
        "give untrained positions any finite weight (0 or 1: their label is -100)"
    )


def count_trained_tokens(
    labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX, per_row: bool = False
) -> torch.Tensor:
    """Number of positions the loss trains: an int64 tensor, 0-dim (or ``[batch]`` with ``per_row``), no host sync.

    With ``shift=True`` the first label of every row is never a target, so it is not counted.
    """
    trained = (labels[..., 1:] if shift else labels) != ignore_index
    return trained.sum(-1) if per_row else trained.sum()


def validate_labels(
    targets: torch.Tensor,
    vocab_size: int,
    ignore_index: int = IGNORE_INDEX,
    loss_weights: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the first target outside ``[0, vocab_size)`` other than ``ignore_index``,
    or the first of ``loss_weights`` (as the caller gave them, aligned with ``labels``) that is not finite.

    Runs before the cross-entropy so that a bad label is a readable error instead of a CUDA
    device-side assert. It costs one host sync, the weights' check included.
    """
    invalid = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if loss_weights is None:
        bad_label, bad_weight = bool(invalid.any()), False
    else:
        loss_weights = torch.as_tensor(loss_weights).detach()
        nonfinite = ~torch.isfinite(loss_weights)
        flags = torch.stack([invalid.any(), nonfinite.any().to(invalid.device)])
        bad_label, bad_weight = flags.tolist()  # the one host sync of both checks
    if bad_weight and not bad_label:
        raise _nonfinite_weight_error(loss_weights, nonfinite)
    if bad_label:
        position = tuple(int(i) for i in invalid.nonzero()[0].tolist())
        value = int(targets[position])
        raise ValueError(
            f"label {value} at position {position} (of labels shaped {tuple(targets.shape)}) is outside "
            f"[0, {vocab_size}) and is not ignore_index={ignore_index}. Labels must be token ids of a "
            f"vocabulary of {vocab_size} (check that the tokenizer matches the model, and resize the "
            f"embeddings after adding tokens) or {ignore_index} for untrained positions."
        )


def check_labels_shape(
    labels: torch.Tensor, scores: torch.Tensor, scores_name: str, last_dim_name: str
) -> None:
    """Raise ``ValueError`` unless ``labels`` holds integer ids shaped like ``scores`` without its last dimension.

    Any integer dtype is accepted (int64, int32, uint8, ...); floating point, complex and bool labels are
    refused, the same way by the eager and the fused loss.
    """
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be integer token ids (any integer dtype), got {labels.dtype}; convert them with "
            "labels.long() if they hold ids, or build them from input_ids"
        )
    if tuple(labels.shape) != tuple(scores.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {scores_name} shape {tuple(scores.shape)} "
            f"without its {last_dim_name} dimension {tuple(scores.shape[:-1])}. Pass labels aligned with "
            "input_ids (the loss shifts them) or pre-shifted targets with shift=False."
        )


def reduce_token_losses(
    token_losses: torch.Tensor,
    trained: torch.Tensor,
    reduction: Reduction,
    num_items_in_batch: torch.Tensor | int | float | None,
) -> torch.Tensor:
    """Apply a reduction to per-position losses that are already 0 where not trained.

    ``mean`` divides the sum by ``num_items_in_batch`` when given (the trained tokens of the whole
    optimizer step), else by the number of trained positions here. A denominator of 0 means there is
    nothing to train: the sum is then 0 and so is the loss (never 0/0 = NaN).
    """
    if reduction == "none":
        return token_losses
    total = token_losses.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        denominator = trained.sum()
    elif torch.is_tensor(num_items_in_batch):
        denominator = num_items_in_batch.to(device=total.device)
    else:
        denominator = torch.tensor(float(num_items_in_batch), device=total.device)
    return total / denominator.clamp(min=1).to(total.dtype)


def apply_token_loss(
    token_losses: torch.Tensor,
    labels: torch.Tensor,
    token_loss: TokenLoss,
    *,
    shift: bool = True,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    num_items_in_batch: torch.Tensor | int | float | None = None,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn per-position losses into a custom per-token loss, then weight and reduce it.

    Args:
        token_losses: ``[batch, seq]`` float32 losses of each position, 0 where not trained (what
            ``causal_lm_loss`` and ``fused_linear_cross_entropy`` return with ``reduction="none"``).
        labels: ``[batch, seq]`` the labels they were computed from (``shift`` as there).
        token_loss: ``[trained]`` losses (in the order of the trained positions, row by row) to
            ``[trained]`` values; e.g. ``lambda ce: (1 - torch.exp(-ce)) ** 2 * ce`` (focal, gamma 2).
        shift, ignore_index, reduction, num_items_in_batch, loss_weights: as :func:`causal_lm_loss`; the
            weights multiply the values ``token_loss`` returns, and ``"mean"`` still divides by the trained
            tokens (or ``num_items_in_batch``).

    Returns:
        A float32 scalar, or ``[batch, seq]`` values (0 where not trained) for ``reduction="none"``.

    Raises:
        ValueError: ``token_loss`` returned a tensor of another shape than its input.

    Host syncs: one (selecting the trained positions sizes the ``[trained]`` tensor).
    """
    targets = shift_labels(labels.to(token_losses.device), ignore_index) if shift else labels
    trained = targets.to(token_losses.device) != ignore_index
    selected = token_losses[trained]
    values = token_loss(selected)
    if not torch.is_tensor(values) or tuple(values.shape) != tuple(selected.shape):
        shape = tuple(values.shape) if torch.is_tensor(values) else type(values).__name__
        raise ValueError(
            f"the per-token loss {getattr(token_loss, '__qualname__', token_loss)} returned {shape} for "
            f"{tuple(selected.shape)} token losses; it must return one value per trained token, the same "
            "shape as its input (the trainer sums them and divides by the step's trained tokens)"
        )
    values = values.float()
    if loss_weights is not None:
        weights = prepare_loss_weights(loss_weights, labels, shift=shift, device=token_losses.device)
        values = values * weights[trained]
    if reduction == "none":
        placed = torch.zeros_like(token_losses)
        placed[trained] = values
        return placed
    return reduce_token_losses(values, trained, reduction, num_items_in_batch)


def _check_reduction(reduction: str, label_smoothing: float, z_loss: float) -> None:
    check_choice("reduction", reduction, REDUCTIONS)
    check_loss_options(label_smoothing, z_loss)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    num_items_in_batch: torch.Tensor | int | float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    loss_type: LossType = "nll",
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy over the trained tokens.

    Args:
        logits: ``[batch, seq, vocab]`` (or any ``[..., vocab]``), any floating dtype; the math runs in
            float32.
        labels: ``[batch, seq]``, aligned with ``input_ids`` when ``shift=True``; already the targets of
            each position when ``shift=False`` (plain token-level cross-entropy, or pre-shifted
            ``shift_labels`` from a context-parallel caller). Moved to the logits' device.
        shift: pair ``logits[..., t, :]`` with ``labels[..., t + 1]``.
        ignore_index: label value of untrained positions.
        reduction: ``"mean"`` (sum / ``num_items_in_batch`` or / trained tokens), ``"sum"``, or
            ``"none"`` (a loss per position, shaped like ``labels``, 0 where not trained).
        num_items_in_batch: denominator of ``"mean"``: the trained tokens of the whole optimizer step,
            over all micro-batches and ranks, so that gradient accumulation and data parallelism give
            the update of one big batch.
        label_smoothing: as ``torch.nn.functional.cross_entropy``:
            ``(1 - eps) * nll + eps * mean_v(-log p_v)``.
        z_loss: weight of ``logsumexp(logits) ** 2`` added per trained token (PaLM's z-loss), reduced
            like the cross-entropy.
        logit_scale, logit_softcap: for raw ``lm_head`` outputs of a model that transforms them, the
            loss is taken on ``cap * tanh(logit_scale * logits / cap)`` (no cap when None): Cohere and
            Granite scale, Gemma 2 soft-caps. A model's own ``logits`` output is already transformed.
        loss_type: ``"nll"`` (the cross-entropy) or ``"dft"`` (each token's cross-entropy times its
            detached target probability, :mod:`hf_shift_loss.loss.weighting`; the normalization is
            unchanged).
        loss_weights: optional ``[batch, seq]`` (``labels``' shape) float weight per token, aligned with
            ``labels`` and shifted with them: each trained token's loss is multiplied by its weight. The
            ``"mean"`` denominator stays the number of trained tokens (or ``num_items_in_batch``), so
            all-ones weights give exactly the unweighted loss and weights of 2 double it. Weights get no
            gradient; each must be finite (checked: one host sync).

    Returns:
        A float32 scalar (``"mean"``, ``"sum"``) or a float32 tensor shaped like ``labels`` (``"none"``,
        weighted when ``loss_weights`` are given).

    Raises:
        ValueError: ``labels`` does not match ``logits.shape[:-1]``, a label is outside
            ``[0, vocab)`` and is not ``ignore_index``, ``loss_weights`` do not match ``labels`` or hold a
            value that is not finite, or an option is out of range.

    Examples:
        With ``shift=False`` it is ``torch.nn.CrossEntropyLoss()(logits, labels)``; three tokens, three
        classes, the second token not trained:

        >>> import torch
        >>> from hf_shift_loss.loss import causal_lm_loss
        >>> logits = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> targets = torch.tensor([0, -100, 2])
        >>> print(f"{causal_lm_loss(logits, targets, shift=False):.8f}")
        0.51058030
        >>> causal_lm_loss(logits, targets, shift=False, reduction="none")
        tensor([0.4170, 0.0000, 0.6041])

        With the default ``shift=True``, labels are aligned with ``input_ids`` and the logits at position
        ``t`` are scored against ``labels[t + 1]``: one sequence of 4 tokens whose tokens 1 and 3 are
        trained (``-100`` for the prompt) gives the same loss from the same three rows of logits:

        >>> logits = torch.cat([logits, torch.zeros(1, 3)])[None]  # [batch=1, seq=4, vocab=3]
        >>> labels = torch.tensor([[-100, 0, -100, 2]])
        >>> print(f"{causal_lm_loss(logits, labels):.8f}")
        0.51058030
        >>> causal_lm_loss(logits, labels, reduction="none")
        tensor([[0.4170, 0.0000, 0.6041, 0.0000]])
        >>> print(f"{causal_lm_loss(logits, labels, reduction='sum'):.4f}")
        1.0212

        ``loss_weights`` are aligned with ``labels`` too: weighting token 3 by 2 doubles its loss, and the
        mean still divides by the 2 trained tokens:

        >>> weights = torch.tensor([[1.0, 1.0, 1.0, 2.0]])
        >>> causal_lm_loss(logits, labels, loss_weights=weights, reduction="none")
        tensor([[0.4170, 0.0000, 1.2083, 0.0000]])
        >>> print(f"{causal_lm_loss(logits, labels, loss_weights=weights):.8f}")
        0.81264561
    """
    _check_reduction(reduction, label_smoothing, z_loss)
    weighting = token_weighting(loss_type, label_smoothing=label_smoothing, z_loss=z_loss)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., vocab], got shape {tuple(logits.shape)}")
    check_labels_shape(labels, logits, "logits", "vocab")
    if logits.is_floating_point() is False:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    vocab_size = logits.shape[-1]

    # Model parallelism: the lm_head (and so the logits) may live on another device than the batch.
    labels = labels.to(device=logits.device, dtype=torch.long)  # cross_entropy takes int64 targets
    targets = shift_labels(labels, ignore_index) if shift else labels
    weights = (
        None
        if loss_weights is None
        else prepare_loss_weights(loss_weights, labels, shift=shift, device=logits.device, validate=False)
    )
    validate_labels(targets, vocab_size, ignore_index, loss_weights)

    # Flatten to [tokens, vocab]: a view when the logits are contiguous. The float32 math copies bfloat16 or
    # float16 logits once (.float()); float32 logits are used as they are.
    flat_logits = logits.reshape(-1, vocab_size).float()
    if logit_scale != 1.0 or logit_softcap is not None:
        scale, softcap = logit_transform(logit_scale, logit_softcap)
        flat_logits = flat_logits * scale
        if softcap is not None:
            flat_logits = softcap * torch.tanh(flat_logits / softcap)
    flat_targets = targets.reshape(-1)
    trained = flat_targets != ignore_index

    if z_loss == 0.0:
        # The loss: cross-entropy of each position's logits against the next token, 0 where ignored.
        token_losses = F.cross_entropy(
            flat_logits,
            flat_targets,
            ignore_index=ignore_index,
            reduction="none",
            label_smoothing=label_smoothing,
        )
    else:
        # One logsumexp serves the cross-entropy (lse - x_target) and the z-loss (lse^2): a second pass
        # over the logits just for the z-loss would double the largest reads of the step.
        log_partition = torch.logsumexp(flat_logits, dim=-1)
        target_logits = flat_logits.gather(-1, flat_targets.masked_fill(~trained, 0).unsqueeze(-1)).squeeze(
            -1
        )
        token_losses = log_partition - target_logits
        if label_smoothing > 0.0:
            uniform_losses = log_partition - flat_logits.mean(dim=-1)
            token_losses = (1.0 - label_smoothing) * token_losses + label_smoothing * uniform_losses
        token_losses = token_losses + z_loss * log_partition.square()
        token_losses = torch.where(trained, token_losses, torch.zeros_like(token_losses))
    if weighting is not None:  # untrained positions: 0 * weight = 0; reads the plain token losses
        token_losses = token_losses * weighting(token_losses)
    if weights is not None:  # untrained positions stay 0: their loss is 0 and every weight is finite
        token_losses = token_losses * weights.reshape(-1)

    if reduction == "none":
        return token_losses.view(targets.shape)
    return reduce_token_losses(token_losses, trained, reduction, num_items_in_batch)
