"""The model card ``ShiftLossTrainer`` writes next to a saved model (``README.md``), without any network.

What TRL's SFT card says (base model, dataset, tags, a quick-start snippet, the framework versions)
plus what only this trainer knows: the loss path and why, what was trained, the normalization and the
exact data counts (the run summary, :meth:`hf_shift_loss.ShiftLossTrainer.run_summary`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MODEL_TAGS", "base_model_id", "model_card"]

# Tags of every model this trainer saves (TRL's SFTTrainer tags "trl", "sft").
MODEL_TAGS = ("hf_shift_loss", "sft")


def base_model_id(config: Any) -> str | None:
    """The hub id the model was loaded from (``config._name_or_path``), None for a local folder or none."""
    name = getattr(config, "_name_or_path", None) or None
    return None if name is None or os.path.isdir(name) else name


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import datasets
    import tokenizers
    import torch
    import transformers

    return {
        "hf_shift_loss": version("hf_shift_loss"),
        "Transformers": transformers.__version__,
        "Pytorch": torch.__version__,
        "Datasets": datasets.__version__,
        "Tokenizers": tokenizers.__version__,
    }


def model_card(
    *,
    model_name: str,
    base_model: str | None,
    run_summary: str,
    dataset_name: str | Sequence[str] | None = None,
    hub_model_id: str | None = None,
    tags: Sequence[str] = (),
    card_data: Mapping[str, Any] | None = None,
) -> str:
    """The text of ``README.md``: YAML metadata (``huggingface_hub.ModelCardData``) and the card body.

    Args:
        model_name: the saved model's name (its folder, or the hub repo's name).
        base_model: the hub id it was fine-tuned from, or None (a local or in-memory model).
        run_summary: what was trained and how (the trainer's run summary, kept verbatim).
        dataset_name: the hub dataset(s) it was trained on, if known.
        hub_model_id: ``user/repo`` where it is pushed (the quick start loads it), else ``model_name``.
        tags: tags added to :data:`MODEL_TAGS` and ``generated_from_trainer``.
        card_data: other metadata fields (``license``, ``language``, ...), written as given.

    Examples:
        >>> text = model_card(model_name="out", base_model="org/base", run_summary="loss: eager")
        >>> "base_model: org/base" in text and "- hf_shift_loss" in text and "loss: eager" in text
        True
    """
    from huggingface_hub import ModelCardData

    all_tags = list(dict.fromkeys(["generated_from_trainer", *MODEL_TAGS, *tags]))
    data = ModelCardData(
        base_model=base_model,
        datasets=dataset_name,
        library_name="transformers",
        model_name=model_name,
        tags=all_tags,
        **dict(card_data or {}),
    )
    source = (
        f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a model given in memory"
    )
    dataset = ""
    if isinstance(dataset_name, str):
        dataset = f" on the [{dataset_name}](https://huggingface.co/datasets/{dataset_name}) dataset"
    elif dataset_name:
        dataset = " on " + ", ".join(dataset_name)
    versions = "\n".join(f"- {name}: {version}" for name, version in _versions().items())
    return f"""---
{data.to_yaml()}
---

# Model Card for {model_name}

This model is a fine-tuned version of {source}{dataset}.
It has been trained with [hf_shift_loss](https://pypi.org/project/hf-shift-loss/)'s `ShiftLossTrainer` (a
`transformers.Trainer`): supervised fine-tuning with the causal-LM loss normalized over the trained tokens
of every optimizer step.

## Quick start

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{hub_model_id or model_name}", device_map="auto")
output = generator([{{"role": "user", "content": "Hello!"}}], max_new_tokens=128, return_full_text=False)[0]
print(output["generated_text"])
```

## Training procedure

What was trained, with which loss, on how much data:

```text
{run_summary}
```

### Framework versions

{versions}
"""
