"""The chunked lm_head + cross-entropy kernel: a ``torch.autograd.Function`` and its loop over chunks.

:func:`hf_shift_loss.loss.fused.fused_linear_cross_entropy` validates, shifts and selects the rows; this
module only computes, for the rows it is given:

1. The selected rows are processed in chunks of ``chunk_size`` rows. At most one chunk of float32 logits
   ``[chunk_size, vocab]`` exists at any time (plus one low-precision copy for bfloat16/float16 inputs).
2. For ``reduction="mean"``/``"sum"`` the gradients wrt ``hidden``, ``weight`` and ``bias`` are computed in
   the forward pass, chunk by chunk, while the chunk's logits are still in memory (as Liger-Kernel does).
   Why: a scalar loss's upstream gradient is one number, so backward only has to scale the stored
   gradients. That costs 3 matmuls per chunk (6·N·H·V FLOPs, the same as eager) instead of the 4 matmuls
   (8·N·H·V) of recomputing the logits in backward, and the logits never need to be stored. The price is
   that the gradients (``[tokens, hidden]`` and a float32 ``[vocab, hidden]``) exist from the forward
   pass on; they are the same tensors autograd would allocate in backward anyway.
   ``reduction="none"`` has a per-token upstream gradient unknown at forward time, so there the logits
   are recomputed in backward (8·N·H·V).

The gradients of each chunk are accumulated by :mod:`hf_shift_loss.loss.gradients`. See docs/fused-loss.md
for the memory and FLOP math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_shift_loss.loss.eager import LogitTransform
from hf_shift_loss.loss.gradients import _GradientAccumulator
from hf_shift_loss.loss.weighting import TokenWeighting

__all__ = ["ChunkedLinearCrossEntropy"]


def _chunk_logits(
    hidden_rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logits: torch.Tensor,
    low_precision_logits: torch.Tensor | None,
) -> None:
    """Write ``hidden_rows @ weight.T + bias`` as float32 into ``logits`` ``[rows, vocab]``.

    Low-precision inputs are multiplied in their own dtype (as the eager ``lm_head`` does) into
    ``low_precision_logits``, then upcast: the same rounding as ``causal_lm_loss(lm_head(h))``.
    """
    out = logits if low_precision_logits is None else low_precision_logits
    if bias is None:
        torch.mm(hidden_rows, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden_rows, weight.t(), out=out)
    if low_precision_logits is not None:
        logits.copy_(low_precision_logits)


def _token_losses_and_softmax_(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses of one chunk; turns ``logits`` ``[rows, vocab]`` in place into ``exp(logits - max)``.

    Returns:
        ``token_losses`` ``[rows]``, ``log_partition`` (logsumexp) ``[rows]`` and ``exp_sum`` ``[rows]``
        (so that ``softmax = logits / exp_sum[:, None]`` afterwards), all float32.
    """
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    mean_logits = logits.mean(dim=1) if label_smoothing > 0.0 else None
    # logsumexp written out in place: the exp is reused for the gradient, and no [rows, vocab] temporary.
    row_max = logits.amax(dim=1)
    logits.sub_(row_max[:, None]).exp_()
    exp_sum = logits.sum(dim=1)
    log_partition = exp_sum.log() + row_max
    # Label smoothing as F.cross_entropy: (1 - eps) * (lse - x_target) + eps * (lse - mean_v x_v).
    token_losses = log_partition - (1.0 - label_smoothing) * target_logits
    if mean_logits is not None:
        token_losses = token_losses - label_smoothing * mean_logits
    if z_loss > 0.0:
        token_losses = token_losses + z_loss * log_partition.square()
    return token_losses, log_partition, exp_sum


def _grad_logits_(
    exp_logits: torch.Tensor,
    targets: torch.Tensor,
    log_partition: torch.Tensor,
    exp_sum: torch.Tensor,
    row_scale: torch.Tensor | None,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """d(token loss)/d(logits) ``[rows, vocab]``, in place of ``exp_logits`` (= ``exp(logits - max)``).

    ``softmax * (1 + 2 z lse) - (1 - eps) * onehot(target) - eps / vocab``, each row times ``row_scale``
    (the upstream gradient of each token, or None for 1).
    """
    softmax_scale = exp_sum.reciprocal()
    if z_loss > 0.0:
        softmax_scale = softmax_scale * (1.0 + 2.0 * z_loss * log_partition)
    target_grad = torch.full_like(log_partition, -(1.0 - label_smoothing))
    if row_scale is not None:
        softmax_scale = softmax_scale * row_scale
        target_grad = target_grad * row_scale
    grad = exp_logits.mul_(softmax_scale[:, None])
    if label_smoothing > 0.0:
        uniform_grad = torch.full_like(log_partition, -label_smoothing / exp_logits.shape[1])
        grad.add_((uniform_grad if row_scale is None else uniform_grad * row_scale)[:, None])
    grad.scatter_add_(1, targets[:, None], target_grad[:, None])
    return grad


def _entropies(exp_logits: torch.Tensor, exp_sum: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax ``[rows]`` from ``exp(logits - max)`` and its row sums:
    ``log(S) - sum_v e_v log(e_v) / S`` (``xlogy``: an underflowed ``e_v = 0`` adds 0, never NaN)."""
    return exp_sum.log() - torch.xlogy(exp_logits, exp_logits).sum(dim=1) / exp_sum


def _transform_logits_(logits: torch.Tensor, transform: LogitTransform, tanh: torch.Tensor | None) -> None:
    """In place: ``logits = cap * tanh(scale * logits / cap)``; keeps ``tanh`` for the gradient."""
    if transform.scale != 1.0:
        logits.mul_(transform.scale)
    if transform.softcap is not None:
        torch.div(logits, transform.softcap, out=tanh).tanh_()
        torch.mul(tanh, transform.softcap, out=logits)


def _raw_logits_grad_(grad: torch.Tensor, transform: LogitTransform, tanh: torch.Tensor | None) -> None:
    """In place: d(loss)/d(transformed logits) -> d(loss)/d(raw logits)."""
    if transform.softcap is not None:
        grad.mul_(tanh.square_().neg_().add_(1.0))  # d/dz cap * tanh(z / cap) = 1 - tanh^2
    if transform.scale != 1.0:
        grad.mul_(transform.scale)


def _chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
    transform: LogitTransform,
    visit: Callable[[slice, torch.Tensor, torch.Tensor], torch.Tensor | None],
) -> _GradientAccumulator | None:
    """The one loop over chunks of trained rows, serving the forward and the backward recompute.

    For each chunk of ``rows`` (indices into ``hidden``; None: every row of ``hidden`` in order, each
    chunk a slice of ``hidden``, as the sync-free mode runs) it writes the chunk's float32 logits
    ``[rows, V]`` into a buffer reused by every chunk (:func:`_chunk_logits`) and calls
    ``visit(span, logits, chunk_targets)``, where ``span`` is the chunk's slice of ``rows``/``targets``.
    ``visit`` may overwrite ``logits`` in place and returns d(loss)/d(logits) of the chunk (float32
    ``[rows, V]``, usually ``logits`` itself), or None when no gradient is wanted. The logits it sees
    are already scaled and soft-capped (``transform``); the loop turns the gradient it returns into the
    gradient of the raw ``hidden @ weight.T + bias`` (chain rule: ``* (1 - tanh^2) * scale``).

    Returns:
        The gradients wrt ``hidden``, ``weight`` and ``bias`` accumulated over the chunks, or None when
        ``needs_grad`` is all False (then nothing is allocated for them).
    """
    num_trained = hidden.shape[0] if rows is None else rows.shape[0]
    vocab_size = weight.shape[0]
    rows_per_chunk = max(1, min(chunk_size, num_trained))
    logits_buffer = torch.empty(rows_per_chunk, vocab_size, dtype=torch.float32, device=hidden.device)
    low_precision_buffer = (
        torch.empty(rows_per_chunk, vocab_size, dtype=weight.dtype, device=hidden.device)
        if weight.dtype != torch.float32
        else None
    )
    grads = (
        _GradientAccumulator(hidden, weight, bias, needs_grad, rows_per_chunk if rows is not None else 0)
        if any(needs_grad)
        else None
    )
    # Soft-capping needs tanh(z / cap) again for the gradient, after the loss overwrote the logits.
    tanh_buffer = torch.empty_like(logits_buffer) if transform.softcap is not None else None
    for start in range(0, num_trained, rows_per_chunk):
        end = min(start + rows_per_chunk, num_trained)
        if rows is None:
            chunk_rows = slice(start, end)
            hidden_rows = hidden[start:end]  # a view: no copy
        else:
            chunk_rows = rows[start:end]
            hidden_rows = hidden.index_select(0, chunk_rows)
        if torch.compiler.is_compiling():
            # Traced, the loop is unrolled and Inductor plans the memory itself (a chunk's buffers are
            # reused once dead). Fresh buffers per chunk: with one buffer mutated by every chunk,
            # Inductor (torch 2.13, CPU) produced wrong gradients for some chunks (bias + z-loss +
            # soft-cap), while aot_eager was exact.
            logits_buffer = torch.empty_like(logits_buffer)
            tanh_buffer = None if tanh_buffer is None else torch.empty_like(tanh_buffer)
            if low_precision_buffer is not None:
                low_precision_buffer = torch.empty_like(low_precision_buffer)
        logits = logits_buffer[: end - start]
        low_precision_logits = None if low_precision_buffer is None else low_precision_buffer[: end - start]
        _chunk_logits(hidden_rows, weight, bias, logits, low_precision_logits)
        tanh = None if tanh_buffer is None else tanh_buffer[: end - start]
        _transform_logits_(logits, transform, tanh)
        grad_logits = visit(slice(start, end), logits, targets[start:end])
        if grad_logits is not None:
            _raw_logits_grad_(grad_logits, transform, tanh)
        if grads is not None and grad_logits is not None:
            grads.add_chunk(grad_logits, low_precision_logits, hidden_rows, chunk_rows)
    return None if grads is None else grads.finish()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Chunked ``lm_head`` + cross-entropy over the selected rows of ``hidden`` (see the module docstring).

    forward inputs: ``hidden`` ``[positions, H]`` (all positions; rows are gathered per chunk so no
    ``[trained, H]`` copy is made), ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``rows`` ``[trained]``
    int64 indices into ``hidden``, ``targets`` ``[trained]``, ``trained`` None, ``loss_weights``
    ``[trained]`` float32 (``[positions]`` in sync-free mode) or None: a per-row scale of the loss and of
    its gradient, applied chunk by chunk (no gradient flows into the weights).

    Sync-free mode (``rows`` None): every row of ``hidden`` is processed, ``targets`` ``[positions]`` holds
    an in-range id everywhere, and ``trained`` ``[positions]`` (bool) says which rows count: the others get
    a loss of exactly 0 and a zero gradient (their upstream gradient is replaced by 0), with no
    data-dependent shape or host sync, so that the whole computation traces under
    ``torch.compile(fullgraph=True)``.

    forward outputs: the float32 loss (the sum over trained tokens when ``per_token`` is False, else the
    ``[trained]`` losses, ``[positions]`` in sync-free mode) and the 0-dim int64 number of correct argmax
    predictions (if ``count_correct``), and the 0-dim float32 sum over trained rows of the entropy of
    the predicted distribution (if ``sum_entropy``; TRL's logged ``entropy`` is its mean).

    forward and backward run the same :func:`_chunk_loop`; they differ only in what they do with a
    chunk's logits.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor | None,
        targets: torch.Tensor,
        trained: torch.Tensor | None,
        loss_weights: torch.Tensor | None,
        chunk_size: int,
        label_smoothing: float,
        z_loss: float,
        transform: LogitTransform,
        per_token: bool,
        count_correct: bool,
        needs_grad: tuple[bool, bool, bool],
        weighting: TokenWeighting | None = None,
        sum_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_rows = targets.shape[0]
        device = hidden.device
        # Scalar loss: gradients now, while the logits are in memory (module docstring, point 3).
        grads_in_forward = not per_token and any(needs_grad)
        # The upstream gradient of each row's token in the forward pass: its loss weight, times 0/1 for
        # trained in sync-free mode.
        row_weights = None if trained is None else trained.to(torch.float32)
        if loss_weights is not None:
            row_weights = loss_weights if row_weights is None else row_weights * loss_weights

        summed_loss = torch.zeros((), dtype=torch.float32, device=device)
        token_losses = torch.empty(num_rows if per_token else 0, dtype=torch.float32, device=device)
        log_partitions = torch.empty(num_rows if per_token else 0, dtype=torch.float32, device=device)
        # A per-token weighting (loss_type="dft"): the backward of per-token losses needs the weights again.
        token_weights = torch.empty(
            num_rows if per_token and weighting is not None else 0, dtype=torch.float32, device=device
        )
        correct_tokens = torch.zeros((), dtype=torch.int64, device=device)
        entropy_sum = torch.zeros((), dtype=torch.float32, device=device)

        def losses_of_chunk(
            span: slice, logits: torch.Tensor, chunk_targets: torch.Tensor
        ) -> torch.Tensor | None:
            if count_correct:
                hits = logits.argmax(dim=1) == chunk_targets
                correct_tokens.add_((hits if trained is None else hits & trained[span]).sum())
            losses, log_partition, exp_sum = _token_losses_and_softmax_(
                logits, chunk_targets, label_smoothing, z_loss
            )
            if sum_entropy:  # before the gradient overwrites the chunk's exp(logits - max)
                entropies = _entropies(logits, exp_sum)
                entropy_sum.add_((entropies if trained is None else entropies * trained[span]).sum())
            if trained is not None:
                losses = torch.where(trained[span], losses, torch.zeros_like(losses))
            # The weighting (loss_type="dft") reads the plain token losses, before any loss weight.
            weights = None if weighting is None else weighting(losses)
            if weights is not None:
                losses = losses * weights
                if per_token:
                    token_weights[span] = weights
            if loss_weights is not None:
                losses = losses * loss_weights[span]
            if per_token:
                token_losses[span] = losses
                log_partitions[span] = log_partition
            else:
                summed_loss.add_(losses.sum())
            if not grads_in_forward:
                return None
            row_scale = None if row_weights is None else row_weights[span]
            if weights is not None:
                row_scale = weights if row_scale is None else row_scale * weights
            return _grad_logits_(
                logits, chunk_targets, log_partition, exp_sum, row_scale, label_smoothing, z_loss
            )

        grads = _chunk_loop(
            hidden,
            weight,
            bias,
            rows,
            targets,
            chunk_size,
            needs_grad if grads_in_forward else (False, False, False),
            transform,
            losses_of_chunk,
        )

        ctx.mark_non_differentiable(correct_tokens, entropy_sum)
        ctx.per_token = per_token
        ctx.sync_free = trained is not None
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.options = (chunk_size, label_smoothing, z_loss, transform, needs_grad)
        gradients = (None, None, None) if grads is None else (grads.hidden, grads.weight, grads.bias)
        if per_token:
            ctx.save_for_backward(
                hidden, weight, bias, rows, targets, trained, loss_weights, log_partitions, token_weights
            )
            ctx.weighted = weighting is not None
        elif ctx.sync_free:
            # Saved tensors, not a ctx attribute: what torch.compile traces (and autograd's own version
            # check refuses a second backward through the in-place scaled buffers).
            ctx.save_for_backward(*gradients)
        else:
            ctx.gradients = gradients
        return (token_losses if per_token else summed_loss), correct_tokens, entropy_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor | None, _grad_entropy=None):
        no_grad_for_options = (None,) * 13
        if not ctx.per_token:
            if ctx.sync_free:
                gradients = ctx.saved_tensors
            elif ctx.gradients is None:
                raise RuntimeError(
                    "fused_linear_cross_entropy: backward through the same loss twice is not supported "
                    "(its gradients are computed in forward and handed out once); recompute the loss."
                )
            else:
                gradients = ctx.gradients
                ctx.gradients = None
            # In place: these buffers are handed to autograd exactly once (checked above; in sync-free mode
            # a second backward fails autograd's version check of the saved tensors).
            scaled = [None if g is None else g.mul_(grad_loss) for g in gradients]
            return (*_to_dtypes(scaled, ctx.input_dtypes), *no_grad_for_options)

        hidden, weight, bias, rows, targets, trained, loss_weights, log_partitions, token_weights = (
            ctx.saved_tensors
        )
        chunk_size, label_smoothing, z_loss, transform, needs_grad = ctx.options
        grad_loss = grad_loss.float()
        if ctx.weighted:  # d(weight * loss) = weight * d(loss): the weight is detached
            grad_loss = grad_loss * token_weights
        if trained is not None:
            # Untrained rows get exactly 0, whatever their upstream gradient (even inf or NaN).
            grad_loss = torch.where(trained, grad_loss, torch.zeros_like(grad_loss))
        if loss_weights is not None:
            grad_loss = grad_loss * loss_weights

        def grad_of_chunk(span: slice, logits: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
            # The forward's logsumexp is reused: softmax = exp(logits - lse), one pass fewer than forward.
            log_partition = log_partitions[span]
            exp_logits = logits.sub_(log_partition[:, None]).exp_()
            ones = torch.ones_like(log_partition)
            return _grad_logits_(
                exp_logits, chunk_targets, log_partition, ones, grad_loss[span], label_smoothing, z_loss
            )

        grads = _chunk_loop(
            hidden, weight, bias, rows, targets, chunk_size, needs_grad, transform, grad_of_chunk
        )
        gradients = [None, None, None] if grads is None else [grads.hidden, grads.weight, grads.bias]
        return (*_to_dtypes(gradients, ctx.input_dtypes), *no_grad_for_options)


def _to_dtypes(grads: list[torch.Tensor | None], dtypes: tuple) -> list[torch.Tensor | None]:
    """Cast the float32 weight/bias gradients back to the parameters' dtype (a no-op for float32)."""
    return [None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes, strict=True)]
