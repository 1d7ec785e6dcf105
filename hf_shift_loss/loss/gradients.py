"""The gradient accumulator of the chunked kernel (:mod:`hf_shift_loss.loss.kernel`): each chunk's logits
gradient turned into the gradients wrt ``hidden``, ``weight`` and ``bias`` while the chunk is in memory."""

from __future__ import annotations

import torch


class _GradientAccumulator:
    """Gradients wrt hidden ``[positions, H]`` (input dtype), weight ``[V, H]`` and bias ``[V]`` (float32).

    ``weight`` and ``bias`` gradients accumulate over chunks in float32 whatever the input dtype. Nothing
    is allocated or computed for an input that needs no gradient: with a frozen ``lm_head`` (LoRA) the
    weight-gradient matmul is skipped, 4·N·H·V FLOPs instead of 6·N·H·V.
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        needs_grad: tuple[bool, bool, bool],
        rows_per_chunk: int,
    ) -> None:
        """``rows_per_chunk``: rows of the ``[rows, H]`` scratch for gathered rows (0: chunks are slices)."""
        hidden_needs_grad, weight_needs_grad, bias_needs_grad = needs_grad
        self.weight_tensor = weight
        self.hidden = torch.zeros_like(hidden) if hidden_needs_grad else None
        # The first chunk writes the weight and bias gradients, the others add to them: no zero-fill and
        # no read of zeros, which on a [V, H] float32 gradient is a visible share of a small step.
        self.weight = (
            torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            if weight_needs_grad
            else None
        )
        self.bias = (
            torch.empty(bias.shape, dtype=torch.float32, device=bias.device)
            if bias is not None and bias_needs_grad
            else None
        )
        self.written = False
        self.hidden_rows_grad = (
            torch.empty(rows_per_chunk, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
            if hidden_needs_grad and rows_per_chunk > 0
            else None
        )
        self.upcast_on_cpu = weight.device.type == "cpu"
        # Off CPU a low-precision weight-gradient chunk is multiplied in its dtype (tensor cores, float32
        # accumulation inside the matmul) into this scratch, then added to the float32 sum.
        self.weight_grad_scratch = (
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            if weight_needs_grad and weight.dtype != torch.float32 and not self.upcast_on_cpu
            else None
        )

    def add_chunk(
        self,
        grad_logits: torch.Tensor,
        low_precision_logits: torch.Tensor | None,
        hidden_rows: torch.Tensor,
        chunk_rows: torch.Tensor | slice,
    ) -> None:
        """Add one chunk: ``grad_logits`` float32 ``[rows, V]``, ``hidden_rows`` ``[rows, H]``.

        ``chunk_rows``: the chunk's row indices into ``hidden``, or its slice of ``hidden`` (sync-free mode:
        the gradient is then written in place, without the scratch).
        """
        weight = self.weight_tensor
        matmul_grad = grad_logits
        if low_precision_logits is not None:
            # The matmuls run in the weight's dtype, as eager autograd does for a bfloat16 lm_head.
            matmul_grad = low_precision_logits.copy_(grad_logits)
        if self.hidden is not None and isinstance(chunk_rows, slice):
            torch.mm(matmul_grad, weight, out=self.hidden[chunk_rows])
        elif self.hidden is not None:
            hidden_rows_grad = self.hidden_rows_grad[: grad_logits.shape[0]]
            torch.mm(matmul_grad, weight, out=hidden_rows_grad)
            self.hidden.index_copy_(0, chunk_rows, hidden_rows_grad)
        if self.weight is not None:
            if low_precision_logits is None or self.upcast_on_cpu:
                # CPU: exact float32 math costs only a [rows, H] upcast, and CPU low-precision GEMMs are
                # often emulated (slow).
                rows_float = hidden_rows.float()
                if self.written:
                    self.weight.addmm_(grad_logits.t(), rows_float)
                else:
                    torch.mm(grad_logits.t(), rows_float, out=self.weight)
            else:
                torch.mm(matmul_grad.t(), hidden_rows, out=self.weight_grad_scratch)
                if self.written:
                    self.weight.add_(self.weight_grad_scratch)
                else:
                    self.weight.copy_(self.weight_grad_scratch)
        if self.bias is not None:
            if self.written:
                self.bias += grad_logits.sum(dim=0)
            else:
                torch.sum(grad_logits, dim=0, out=self.bias)
        self.written = True

    def finish(self) -> _GradientAccumulator:
        """Zero gradients when no chunk was added (no trained row); returns self."""
        if not self.written:
            for gradient in (self.weight, self.bias):
                if gradient is not None:
                    gradient.zero_()
        return self
