"""The attention check: whether a model keeps packed sequences apart (:func:`check_packing_support`)."""

from __future__ import annotations

from typing import Any

import torch

# Attention backends whose masks come from masking_utils' mask functions, which honour packed
# position_ids (block-diagonal causal mask) when there is no attention_mask and no cache.
_MASK_BACKENDS = ("sdpa", "eager", "flex_attention")
# Backends that read packed position_ids into cu_seqlens for a varlen kernel; transformers only
# does so for a batch of one row (modeling_flash_attention_utils._is_packed_sequence, pinned by
# tests/test_pins.py).
_VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def check_packing_support(
    model: Any, position_ids: torch.Tensor | None = None, *, use_cache: bool | None = None
) -> None:
    """Raise ``ValueError`` saying why if ``model`` would not keep packed sequences apart.

    Packed batches carry ``position_ids`` and no ``attention_mask``. transformers 5 turns them into a
    block-diagonal causal mask (sdpa, eager, flex) or varlen flash-attention calls (pinned by
    tests/test_packing.py and tests/test_pins.py), but only

    - with no KV cache in the forward pass (``use_cache=False``), else the causal mask spans the whole
      row and sequences attend to each other silently;
    - for flash attention, with one row per batch (``per_device_train_batch_size=1``).

    Args:
        model: the causal LM, possibly wrapped (DDP, FSDP, peft).
        position_ids: the batch's ``[rows, T]`` position ids, to check the layout (optional).
        use_cache: the ``use_cache`` the model is called with; ``None`` means the config's default.
    """
    config = _find_config(model)
    backend = getattr(config, "_attn_implementation", None) or "eager"
    if use_cache is None:
        use_cache = bool(getattr(config, "use_cache", False))
    if use_cache:
        raise ValueError(
            "packed batches (position_ids, no attention_mask) need the model called with use_cache=False: "
            "transformers builds the packed (block-diagonal) attention mask only when no KV cache exists, "
            f"and {type(config).__name__}.use_cache is True, so packed sequences would attend to each other. "
            "Call the model with use_cache=False (or set model.config.use_cache = False)."
        )
    if backend in _MASK_BACKENDS:
        return
    if backend in _VARLEN_BACKENDS or "flash" in backend:
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] != 1:
            raise ValueError(
                f"attn_implementation={backend!r} only unpacks packed sequences in a batch of one row, got "
                f"{position_ids.shape[0]} rows; train with per_device_train_batch_size=1 (one packed row per batch)"
            )
        return
    raise ValueError(
        f"attn_implementation={backend!r} is not known to keep packed sequences apart (supported: "
        f"{', '.join(_MASK_BACKENDS + _VARLEN_BACKENDS)}); disable packing or load the model with "
        "attn_implementation='sdpa'"
    )


def _find_config(model: Any) -> Any:
    """The config of a model under DDP / FSDP (``.module``) or peft (``get_base_model``) wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        else:
            break
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"cannot check packing support: {type(model).__name__} has no config")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config
