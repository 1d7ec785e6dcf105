"""Where ``fused_linear_cross_entropy`` was documented: now :mod:`hf_shift_loss.loss.fused` (and the kernel
under it, :mod:`hf_shift_loss.loss.kernel`). This path keeps working."""

from hf_shift_loss.loss.fused import default_chunk_size, fused_linear_cross_entropy

__all__ = ["default_chunk_size", "fused_linear_cross_entropy"]
