"""What the fused loss needs from the engines that shard or partition the lm_head weight.

- FSDP2 shards the weight into a ``DTensor`` and reshards it after the forward: :func:`unsharded` gathers it
  (differentiably) for the loss.
- DeepSpeed ZeRO-3 partitions it and gathers it only inside a call of a module that its hooks cover: the
  fused loss runs inside a call of the lm_head module itself (:func:`~hf_shift_loss.loss.heads.call_as_lm_head`),
  and :func:`zero3_refusal` says when a ZeRO-3 "leaf" module around the head would prevent that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hf_shift_loss.loss.heads import OutputHead

__all__ = ["unsharded", "zero3_refusal"]


def unsharded(parameter: torch.Tensor | None) -> torch.Tensor | None:
    """The full lm_head weight (or bias) when FSDP2 has sharded it (a DTensor), else the parameter itself.

    FSDP2 reshards the parameters after the forward pass, so the loss gathers the weight itself. The
    gather is differentiable: its backward reduce-scatters the weight gradient with the mean over ranks,
    as FSDP2 reduces every other gradient (``Partial("avg")``); tied embeddings add up correctly.
    """
    if parameter is None:
        return None
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # a torch built without distributed
        return parameter
    if not isinstance(parameter, DTensor):
        return parameter
    return parameter.full_tensor(grad_placements=[Partial("avg")] * parameter.device_mesh.ndim)


def zero3_refusal(model: nn.Module, head: OutputHead, zero_optimization: Mapping[str, Any]) -> str | None:
    """Why ZeRO-3 would not gather the lm_head weight in a call of the lm_head module itself; None if it does.

    ZeRO-3 gathers a "leaf" module's parameters, those of its submodules included, only around the leaf's
    own forward and registers no hooks on the submodules: an lm_head inside a leaf is a placeholder when
    the loss calls it. Leaves come from ``stage3_module_granularity_threshold`` (chosen by DeepSpeed when
    the engine starts, after the loss path is chosen, so any threshold refuses) or from
    ``deepspeed.utils.set_z3_leaf_modules`` on the model before training.
    """
    threshold = zero_optimization.get("stage3_module_granularity_threshold") or 0
    if threshold != "auto" and int(threshold) > 0:
        return (
            f"DeepSpeed ZeRO-3 with stage3_module_granularity_threshold={threshold} may make the lm_head's "
            "parent a leaf module, which gathers the lm_head weight only inside its own forward (set it to 0 "
            "for the fused loss)"
        )
    leaf_config = zero_optimization.get("leaf_module") or {}
    for name, module in model.named_modules():
        if module is head.lm_head or not any(sub is head.lm_head for sub in module.modules()):
            continue
        shown = name or type(model).__name__
        if getattr(module, "_z3_leaf", False):
            return (
                f"{shown} is a DeepSpeed ZeRO-3 leaf module (set_z3_leaf_modules), "
                "which gathers the lm_head weight only inside its own forward"
            )
        entry = _leaf_config_entry(name, module, leaf_config)
        if entry is not None:
            return (
                f"{shown} is a DeepSpeed ZeRO-3 leaf module (zero_optimization.leaf_module {entry}), "
                "which gathers the lm_head weight only inside its own forward"
            )
    return None


def _leaf_config_entry(name: str, module: nn.Module, leaf_config: Mapping[str, Any]) -> str | None:
    """The entry of DeepSpeed's ``leaf_module`` config (classes, names, name_suffixes) that makes ``module``
    a leaf when the engine starts, as DeepSpeed matches them; None if none does."""

    def listed(key: str) -> list[str]:
        value = leaf_config.get(key) or []
        return [value] if isinstance(value, str) else [str(item) for item in value]

    cls = type(module)
    for class_name in listed("classes"):
        if class_name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            return f"classes: {class_name!r}"
    if name and name in listed("names"):
        return f"names: {name!r}"
    for suffix in listed("name_suffixes"):
        if name and name.endswith(suffix):
            return f"name_suffixes: {suffix!r}"
    return None
