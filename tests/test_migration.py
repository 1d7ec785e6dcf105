"""docs/migrating-from-trl.md: its before/after scripts run and agree, and its claims about TRL hold.

TRL (``trl==1.16.*``) is a test dependency only. The scripts train a tiny random Llama with the SmolLM2
tokenizer (docs/examples/tiny_model.py), built once here into the test's temporary folder and passed to
both through ``$SHIFT_LOSS_EXAMPLE_MODEL``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("trl")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "docs", "examples")
PAGE = os.path.join(REPO, "docs", "migrating-from-trl.md")
_LOSSES = re.compile(r"first loss (\d+\.\d+), train loss (\d+\.\d+)")

pytestmark = pytest.mark.slow


def page() -> str:
    with open(PAGE, encoding="utf-8") as file:
        return file.read()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sys.path.insert(0, EXAMPLES)
    try:
        import tiny_model
    finally:
        sys.path.remove(EXAMPLES)
    folder = str(tmp_path_factory.mktemp("tiny") / "model")
    tiny_model.build(folder)
    return folder


def run_example(name: str, model_dir: str, cwd) -> tuple[float, float]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "SHIFT_LOSS_EXAMPLE_MODEL": model_dir,
    }
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = _LOSSES.findall(result.stdout)
    assert found, f"{name} printed no loss:\n{result.stdout[-3000:]}"
    return tuple(float(value) for value in found[-1])


@pytest.mark.parametrize("name", ["trl_before.py", "trl_after.py"])
def test_page_shows_the_scripts_as_they_are(name):
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as file:
        code = file.read()
    assert f"[`docs/examples/{name}`](examples/{name}):\n\n```python\n{code}```" in page()


def test_before_and_after_run_and_print_the_pages_losses(model_dir, tmp_path):
    before = run_example("trl_before.py", model_dir, tmp_path)
    after = run_example("trl_after.py", model_dir, tmp_path)
    assert after == pytest.approx(before, abs=2e-3)
    shown = _LOSSES.search(page().split("## Before and after")[1])
    assert shown, "the page shows no printed losses"
    assert tuple(float(value) for value in shown.groups()) == pytest.approx(after, abs=2e-3)


def _trl_prepared(model_dir, rows, tmp_path, **config):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path),
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        use_cpu=True,
        model_init_kwargs={"dtype": "float32"},
        **config,
    )
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))
    return trainer.train_dataset, trainer.processing_class


MESSAGES = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a + b}"},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": f"{2 * (a + b)}"},
        ]
    }
    for a in range(3)
    for b in range(2)
]
PROMPT_COMPLETION = [
    {"prompt": f"Q: What is {a} + {b}?\nA:", "completion": f" {a + b}"} for a in range(3) for b in range(2)
]


@pytest.mark.parametrize(
    "rows, train_on",
    [(MESSAGES, "all"), (PROMPT_COMPLETION, "completion")],
    ids=["messages-trl-default-is-train_on-all", "prompt-completion-same-default"],
)
def test_the_same_tokens_are_trained(model_dir, tmp_path, rows, train_on):
    """What the page says TRL trains by default is what this trainer trains with the setting it names."""
    from hf_shift_loss.data import Encoder

    prepared, tokenizer = _trl_prepared(model_dir, rows, tmp_path)
    encoder = Encoder(tokenizer, max_length=1024, train_on=train_on)
    for row, trl_row in zip(rows, prepared, strict=True):
        ours = encoder(row)
        assert ours["input_ids"] == trl_row["input_ids"]
        assert ours["labels"] == trl_row["labels"]


def test_messages_differ_by_default(model_dir, tmp_path):
    """TRL's default trains the whole conversation; ours only the assistant turns and their end of turn."""
    from hf_shift_loss.data import Encoder

    prepared, tokenizer = _trl_prepared(model_dir, MESSAGES[:1], tmp_path)
    ours = Encoder(tokenizer, max_length=1024)(MESSAGES[0])
    assert all(label != -100 for label in prepared[0]["labels"])
    trained = tokenizer.decode(
        [t for t, label in zip(ours["input_ids"], ours["labels"], strict=True) if label != -100]
    )
    assert trained == "0<|im_end|>0<|im_end|>"


def test_sftconfig_defaults_the_page_states():
    from trl import SFTConfig

    config = SFTConfig(output_dir="unused", use_cpu=True)
    assert (config.learning_rate, config.logging_steps, config.max_length) == (2e-5, 10, 1024)
    assert config.bf16 and config.activation_checkpointing
    assert (config.packing, config.packing_strategy, config.assistant_only_loss) == (False, "bfd", False)
    assert config.completion_only_loss is None and config.truncation_mode == "keep_start"


def test_assistant_only_loss_refuses_smollm2s_template(model_dir, tmp_path):
    with pytest.raises(ValueError, match="not training-compatible"):
        _trl_prepared(model_dir, MESSAGES, tmp_path, assistant_only_loss=True)


def test_conversational_completion_trl_also_trains_the_newline_after_the_end_of_turn(model_dir, tmp_path):
    from hf_shift_loss.data import Encoder

    row = {
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
        "completion": [{"role": "assistant", "content": "5"}],
    }
    prepared, tokenizer = _trl_prepared(model_dir, [row], tmp_path)
    ours = Encoder(tokenizer, max_length=1024)(row)

    def trained(ids, labels):
        return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])

    assert trained(prepared[0]["input_ids"], prepared[0]["labels"]) == "5<|im_end|>\n"
    assert trained(ours["input_ids"], ours["labels"]) == "5<|im_end|>"
