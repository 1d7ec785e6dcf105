"""recipes/sft.py: config parsing (YAML < command line), refusals, any data format, the tiny job end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import sft  # recipes/ is on sys.path (tests/conftest.py)
import torch
import yaml
from datasets import Dataset

from hf_shift_loss.recipe import smollm2_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_PATH = os.path.join(REPO, "recipes", "sft.py")
TINY_YAML = os.path.join(REPO, "recipes", "configs", "tiny.yaml")
DEFAULT_YAML = os.path.join(REPO, "recipes", "configs", "default.yaml")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse(*argv: str):
    return sft.parse_config(
        [sft.RecipeConfig, sft.ShiftLossArguments], list(argv), default_config=sft.DEFAULT_CONFIG
    )


# ------------------------------------------------------------------------------------------ config
def test_no_arguments_is_the_default_job_of_default_yaml():
    assert sft.DEFAULT_CONFIG == DEFAULT_YAML and not hasattr(sft, "DEFAULT_JOB")
    recipe, args = parse()
    # SmolLM2-135M (bundled GGUF), LoRA r16 on every linear layer, 16 steps of 4, lr 1e-3 cosine, 384 tokens.
    assert recipe.model_name_or_path is None and not recipe.tiny_random_model
    assert recipe.use_lora and recipe.lora_r == 16 and recipe.lora_alpha == 32
    assert recipe.lora_target_modules == ALL_LINEAR
    assert recipe.use_chat_template and recipe.eval_rows == 16
    assert recipe.data_path == "recipes/data/humaneval_sft.jsonl"
    assert args.max_steps == 16 and args.per_device_train_batch_size == 4
    assert args.learning_rate == 1e-3 and args.lr_scheduler_type == "cosine"
    assert args.max_length == 384 and args.seed == 42 and not args.packing
    assert args.output_dir == "outputs/sft-smollm2-humaneval"
    # Naming the file gives exactly the same job.
    assert parse("--config", DEFAULT_YAML) == (recipe, args)


def test_command_line_overrides_yaml():
    recipe, args = parse(
        "--config", TINY_YAML, "--learning_rate", "0.5", "--lora_r", "4", "--max_length", "64"
    )
    with open(TINY_YAML, encoding="utf-8") as file:
        tiny = yaml.safe_load(file)
    assert args.learning_rate == 0.5 and recipe.lora_r == 4 and args.max_length == 64
    # Values the command line does not name come from the file, not from the dataclass defaults.
    assert recipe.eval_rows == tiny["eval_rows"] != 16 and args.max_steps == tiny["max_steps"]
    assert recipe.lora_target_modules == tiny["lora_target_modules"] and recipe.tiny_random_model
    recipe, _ = parse(
        "--config", TINY_YAML, "--use_chat_template", "false", "--lora_target_modules", "q_proj"
    )
    assert recipe.use_chat_template is False and recipe.lora_target_modules == ["q_proj"]


def test_yaml_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 reads "2e-4" as a string; the parser converts it with the field's type.
    config = tmp_path / "lr.yaml"
    config.write_text(
        open(TINY_YAML, encoding="utf-8").read().replace("learning_rate: 1.0e-2", "learning_rate: 2e-4")
    )
    assert yaml.safe_load(config.read_text())["learning_rate"] == "2e-4"
    _, args = parse("--config", str(config))
    assert isinstance(args.learning_rate, float) and args.learning_rate == pytest.approx(2e-4)


def test_unknown_yaml_key_exits_2_with_did_you_mean(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("learning_rat: 0.1\nlora_rank: 8\n")
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--config", str(config)])
    assert exit_info.value.code == 2
    assert re.search(r"unknown key 'learning_rat'; did you mean learning_rate", capsys.readouterr().err)


def test_unknown_command_line_flag_exits_2_with_did_you_mean(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--config", TINY_YAML, "--lora_rr", "4"])
    assert exit_info.value.code == 2
    assert "did you mean lora_r" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lora_dropout", "1.5", r"lora_dropout must be in \[0, 1\)"),
        ("--eval_rows", "0", "eval_rows must be at least 1"),
        ("--lora_r", "0", "lora_r must be a positive integer"),
        ("--z_loss", "-1", "z_loss must be >= 0"),
    ],
)
def test_invalid_values_exit_2_with_the_reason_before_loading_anything(capsys, flag, value, message):
    assert sft.main(["--config", TINY_YAML, flag, value]) == 2
    assert re.search(message, capsys.readouterr().err)


# -------------------------------------------------------------------------------------------- data
ROWS = [
    {"prompt": f"Say {word}.", "completion": f"{word}!"} for word in ("one", "two", "three", "four", "five")
]


def recipe_for(path, **overrides):
    recipe, _ = parse("--config", TINY_YAML, "--data_path", str(path), "--eval_rows", "2")
    for key, value in overrides.items():
        setattr(recipe, key, value)
    return recipe


def test_prompt_completion_rows_become_messages_with_a_fixed_split(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    train, held_out, source = sft.load_splits(recipe_for(path))
    assert source == str(path) and len(train) == 3 and len(held_out) == 2
    assert held_out[0]["messages"] == [
        {"role": "user", "content": "Say four."},
        {"role": "assistant", "content": "four!"},
    ]
    train, held_out, _ = sft.load_splits(recipe_for(path, use_chat_template=False))
    assert held_out[1] == ROWS[-1] and train.column_names == ["prompt", "completion"]


def test_the_conversion_is_the_package_s_shared_with_the_inspector(tmp_path):
    from hf_shift_loss.data.formats import prompt_completion_to_messages

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    train, _, _ = sft.load_splits(recipe_for(path))
    assert list(train) == [prompt_completion_to_messages(row) for row in ROWS[:3]]
    assert not hasattr(sft, "as_messages")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["smollm2_source()", "load_model(directory, gguf_file=gguf_file)", "PeftModel.from_pretrained"]),
        ({"model_name_or_path": "/m", "gguf_file": "x.gguf"}, ['load_model("/m", gguf_file="x.gguf")']),
        ({"model_name_or_path": "org/model"}, ["AutoPeftModelForCausalLM.from_pretrained"]),
        ({"tiny": {"hidden_size": 32, "seed": 3}}, ["hidden_size=32, intermediate_size=64, seed=3"]),
        ({"adapter": False}, ["AutoModelForCausalLM.from_pretrained"]),
    ],
)
def test_load_back_code_is_valid_python_for_every_kind_of_run(kwargs, expected):
    from sft_models import load_back_code

    code = load_back_code("out", **{"adapter": True, **kwargs})
    compile(code, "load_back", "exec")
    assert f'load_tokenizer("{os.path.abspath("out")}")' in code
    assert all(fragment in code for fragment in expected), code


@pytest.mark.slow
def test_an_adapter_of_the_gguf_model_saves_without_warnings(tmp_path):
    # The rebuilt GGUF model has no checkpoint directory: no name_or_path for peft to look up when saving.
    from peft import LoraConfig, get_peft_model
    from sft_models import load_model

    directory, gguf_file = smollm2_source()
    model = load_model(directory, gguf_file=gguf_file)
    assert model.name_or_path == ""
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(str(tmp_path))
    assert [str(warning.message) for warning in caught] == []


def test_relative_data_path_resolves_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, source = sft.load_splits(recipe_for("recipes/data/humaneval_sft.jsonl"))
    assert source == os.path.join(REPO, "recipes", "data", "humaneval_sft.jsonl")


def test_sample_prompt_for_every_format():
    directory, gguf_file = smollm2_source()
    tokenizer = sft.load_tokenizer(directory, gguf_file=gguf_file)
    _, args = parse("--config", TINY_YAML)
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    prompt, reference = sft.sample_prompt(chat, tokenizer, args)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") and reference == "Hello"
    assert sft.sample_prompt(ROWS[0], tokenizer, args) == ("Say one.", "one!")
    assert sft.sample_prompt({"text": "plain"}, tokenizer, args) is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["messages.jsonl", "parquet"])
def test_the_recipe_trains_on_any_data_format(tmp_path, capsys, kind):
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"] * 2
    if kind == "messages.jsonl":
        path = tmp_path / "chat.jsonl"
        turns = [
            [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]
            for w in words
        ]
        path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in turns))
    else:
        path = tmp_path / "rows.parquet"
        Dataset.from_list([{"prompt": f"Say {w}.", "completion": f"{w}!"} for w in words]).to_parquet(
            str(path)
        )
    output_dir = tmp_path / "out"
    argv = [
        "--config",
        TINY_YAML,
        "--data_path",
        str(path),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "3",
    ]
    assert sft.main([*argv, "--sample_max_new_tokens", "4", "--require_eval_improvement", "false"]) == 0
    out = capsys.readouterr().out
    assert "eval loss after training:" in out and "--- sample after training" in out
    assert (output_dir / "adapter_model.safetensors").is_file()
    # The trainer prepared and counted both splits (the parquet's prompt/completion rows as messages).
    summary = json.loads((output_dir / "data_summary.json").read_text())
    assert summary["train"]["examples"] == 16 and summary["eval"]["examples"] == 4
    assert 0 < summary["train"]["trained_tokens"] < summary["train"]["total_tokens"]


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_recipe_trains_evaluates_and_saves_a_loadable_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from sft_models import build_tiny_llama

    from hf_shift_loss.data.load import load_tokenizer

    output_dir = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, SFT_PATH, "--config", TINY_YAML, "--output_dir", str(output_dir)],
        cwd=tmp_path,  # the data path in the YAML must resolve from the repository, not the cwd
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout

    before = float(re.search(r"eval loss before training: ([0-9.]+)", out).group(1))
    after = float(re.search(r"eval loss after training: +([0-9.]+)", out).group(1))
    assert after < before
    assert re.search(r"eval loss relative change: -\d", out)
    assert "--- sample after training (first held-out row) ---" in out
    assert "Could not find a config file" not in completed.stderr
    # The printed lines load the adapter back, as printed.
    code = textwrap.dedent(out.split("load them:\n", 1)[1].split("wall time:")[0])
    namespace: dict = {}
    exec(code, namespace)
    assert type(namespace["model"]).__name__ == "PeftModelForCausalLM"
    results = json.loads((output_dir / "recipe_results.json").read_text())
    assert results["before"]["eval_loss"] == pytest.approx(before, abs=1e-4)
    assert results["after"]["eval_loss"] == pytest.approx(after, abs=1e-4)
    summary = json.loads((output_dir / "data_summary.json").read_text())
    assert summary["train"]["examples"] == 32 and summary["train"]["truncated_examples"] > 0  # max_length 256

    # The adapter loads back onto the same base model, and it is a trained one (LoRA B starts at 0).
    tokenizer = load_tokenizer(str(output_dir))
    assert tokenizer.eos_token == "<|im_end|>"
    config = yaml.safe_load((output_dir / "recipe_config.yaml").read_text())
    assert config["output_dir"] == str(output_dir) and config["max_steps"] == 10
    base = build_tiny_llama(
        len(tokenizer),
        hidden_size=config["tiny_hidden_size"],
        intermediate_size=config["tiny_hidden_size"] * 2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=config["seed"],
    )
    input_ids = torch.tensor([[1, 504, 3458, 314, 253]])
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    model = PeftModel.from_pretrained(base, str(output_dir))
    saved = load_file(str(output_dir / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in saved.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().sum() > 0 for tensor in lora_b)
    with torch.no_grad():
        adapted_logits = model(input_ids=input_ids).logits
    assert not torch.allclose(adapted_logits, base_logits)
