"""recipes/sft.py: config parsing (YAML < command line), validation, and the tiny job end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_PATH = os.path.join(REPO, "recipes", "sft.py")
TINY_YAML = os.path.join(REPO, "recipes", "configs", "tiny.yaml")
DEFAULT_YAML = os.path.join(REPO, "recipes", "configs", "default.yaml")


@pytest.fixture(scope="module")
def sft():
    spec = importlib.util.spec_from_file_location("sft_recipe", SFT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ config
def test_default_yaml_mirrors_the_embedded_default(sft):
    with open(DEFAULT_YAML, encoding="utf-8") as file:
        assert yaml.safe_load(file) == sft.DEFAULT_CONFIG


def test_no_arguments_gives_the_default_job(sft):
    recipe, training = sft.parse_config([])
    assert recipe.model_name_or_path is None and recipe.use_lora and not recipe.tiny_random_model
    assert training.max_steps == sft.DEFAULT_CONFIG["max_steps"]
    assert training.learning_rate == sft.DEFAULT_CONFIG["learning_rate"]
    assert training.output_dir == sft.DEFAULT_CONFIG["output_dir"]


def test_command_line_overrides_yaml(sft, tmp_path):
    recipe, training = sft.parse_config(
        ["--config", TINY_YAML, "--learning_rate", "0.5", "--lora_r", "4", "--output_dir", str(tmp_path)]
    )
    with open(TINY_YAML, encoding="utf-8") as file:
        tiny = yaml.safe_load(file)
    assert tiny["learning_rate"] != 0.5 and tiny["lora_r"] != 4
    assert training.learning_rate == 0.5 and recipe.lora_r == 4 and training.output_dir == str(tmp_path)
    # Values the command line does not name come from the file, not from the dataclass defaults.
    assert recipe.eval_rows == tiny["eval_rows"] != 16
    assert training.max_steps == tiny["max_steps"]
    assert recipe.lora_target_modules == tiny["lora_target_modules"]
    assert recipe.tiny_random_model is True


def test_command_line_overrides_yaml_booleans_and_lists(sft):
    recipe, _ = sft.parse_config(
        ["--config", TINY_YAML, "--use_chat_template", "false", "--lora_target_modules", "q_proj", "v_proj"]
    )
    assert recipe.use_chat_template is False
    assert recipe.lora_target_modules == ["q_proj", "v_proj"]


def write_yaml(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_scientific_notation_without_a_dot_is_a_number(sft, tmp_path):
    # YAML 1.1 reads "2e-4" as a string; the parser converts string defaults with the field's type.
    config = tmp_path / "lr.yaml"
    config.write_text(
        open(TINY_YAML, encoding="utf-8").read().replace("learning_rate: 1.0e-2", "learning_rate: 2e-4")
    )
    assert yaml.safe_load(config.read_text())["learning_rate"] == "2e-4"
    _, training = sft.parse_config(["--config", str(config)])
    assert training.learning_rate == pytest.approx(2e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
        ({"eval_rows": 0}, "eval_rows must be at least 1"),
        ({"sample_index": 8}, "sample_index must be in"),
        ({"lora_r": 0}, "lora_r must be a positive integer"),
        ({"model_dtype": "float64"}, "model_dtype must be"),
        ({"z_loss": -1.0}, "z_loss must be >= 0"),
        ({"learning_rat": 0.1}, "unknown key.*'learning_rat'.*did you mean learning_rate"),
    ],
)
def test_invalid_yaml_values_raise_a_clear_error(sft, tmp_path, overrides, message):
    with open(TINY_YAML, encoding="utf-8") as file:
        values = {**yaml.safe_load(file), **overrides}
    with pytest.raises(sft.ConfigError, match=message):
        sft.parse_config(["--config", write_yaml(tmp_path / "bad.yaml", values)])


def test_invalid_command_line_value_exits_2_with_the_reason(sft, capsys):
    assert sft.main(["--config", TINY_YAML, "--lora_dropout", "2"]) == 2
    assert "lora_dropout must be in [0, 1)" in capsys.readouterr().err
    assert sft.main(["--config", TINY_YAML, "--no_such_flag", "1"]) == 2
    assert "--no_such_flag" in capsys.readouterr().err


def test_missing_config_file_is_an_error(sft, tmp_path):
    with pytest.raises(sft.ConfigError, match="no such file"):
        sft.parse_config(["--config", str(tmp_path / "absent.yaml")])


def test_packing_is_refused_when_the_collator_cannot_pack(sft, monkeypatch):
    class CollatorWithoutPacking:
        def __init__(self, tokenizer, *, max_length=None, mask_prompt=True):
            self.kwargs = {"max_length": max_length, "mask_prompt": mask_prompt}

    monkeypatch.setattr(sft, "PromptMaskingCollator", CollatorWithoutPacking)
    recipe, _ = sft.parse_config(["--config", TINY_YAML])
    assert sft.build_collator(object(), recipe).kwargs == {
        "max_length": recipe.max_length,
        "mask_prompt": True,
    }
    recipe.packing = True
    with pytest.raises(ValueError, match="no packing option"):
        sft.build_collator(object(), recipe)


def test_packing_is_passed_to_a_collator_that_can_pack(sft, monkeypatch):
    class CollatorWithPacking:
        def __init__(self, tokenizer, *, max_length=None, mask_prompt=True, packing=False):
            self.packing = packing

    monkeypatch.setattr(sft, "PromptMaskingCollator", CollatorWithPacking)
    recipe, _ = sft.parse_config(["--config", TINY_YAML, "--packing", "true"])
    assert sft.build_collator(object(), recipe).packing is True
    recipe, _ = sft.parse_config(["--config", TINY_YAML])
    assert sft.build_collator(object(), recipe).packing is False


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_recipe_trains_evaluates_and_saves_a_loadable_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from hf_shift_loss.models import build_tiny_llama, load_tokenizer

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

    assert re.search(r"masking summary \(train\): 32 examples, \d+ tokens, \d+ trained", out)
    before = float(re.search(r"eval loss before training: ([0-9.]+)", out).group(1))
    after = float(re.search(r"eval loss after training: +([0-9.]+)", out).group(1))
    assert after < before
    assert re.search(r"eval loss relative change: -\d", out)
    assert "--- sample after training (held-out row 0) ---" in out
    results = json.loads((output_dir / "recipe_results.json").read_text())
    assert results["eval_loss_before"] == pytest.approx(before, abs=1e-4)
    assert results["eval_loss_after"] == pytest.approx(after, abs=1e-4)

    # The adapter loads back onto the same base model, and it is a trained one (LoRA B starts at 0).
    tokenizer = load_tokenizer(str(output_dir))
    assert tokenizer.eos_token == "<|im_end|>"
    config = yaml.safe_load((output_dir / "recipe_config.yaml").read_text())
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
