"""Small real components built in-process for the tests: a word-level tokenizer, a tiny Llama, and the
fused loss's inputs with a matmul counter."""

from __future__ import annotations

import os
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from hf_shift_loss import ShiftLossArguments

# The tiny Llama builder lives with the recipe's models (recipes/sft_models.py); 2-rank scripts import
# this module without the tests' conftest, so the path is set here.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
from sft_models import build_tiny_llama  # noqa: E402

WORDS = (
    "where is the capital of China The Beijing what France Paris a an and city big small river "
    "name who wrote this book it was written by I do not know yes no"
).split()
SPECIAL = ["<pad>", "<bos>", "<eos>", "<sep>", "<unk>"]


def word_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer whose encoding adds <bos>, as Llama's does."""
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<sep>"],
    )


def tiny_llama(
    vocab_size: int = 64,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    attn_implementation: str | None = None,
) -> LlamaForCausalLM:
    """The tests' tiny Llama: hidden 32, 2 layers, 4 heads (2 KV), ids pad 0 / bos 1 / eos 2.

    Also seeds the global generator: peft draws adapter weights from it, so what a test builds after
    the model is reproducible whatever ran before.
    """
    torch.manual_seed(seed)
    return build_tiny_llama(
        vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        seed=seed,
        attn_implementation=attn_implementation,
    )


# One optimizer step of plain SGD on the CPU, batch 4, no clipping: updates comparable exactly.
SGD_STEP = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    max_steps=1,
    learning_rate=0.5,
    optim="sgd",
    lr_scheduler_type="constant",
    max_grad_norm=0.0,  # no clipping: the update is exactly lr * gradient
    weight_decay=0.0,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
    data_seed=0,
)


def make_args(output_dir, **overrides) -> ShiftLossArguments:
    """One optimizer step of plain SGD on the CPU, batch 4, no clipping (:data:`SGD_STEP`, then ``overrides``)."""
    defaults = dict(SGD_STEP, output_dir=str(output_dir))
    defaults.update(overrides)
    return ShiftLossArguments(**defaults)


# The fused-loss tests' default shape: batch, sequence, hidden size, vocabulary.
FUSED_SHAPE = (2, 9, 16, 37)


def fused_inputs(
    seed: int = 0,
    *,
    batch: int = FUSED_SHAPE[0],
    seq: int = FUSED_SHAPE[1],
    hidden_size: int = FUSED_SHAPE[2],
    vocab: int = FUSED_SHAPE[3],
    with_bias: bool = False,
    masked_fraction: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(hidden [batch, seq, H], weight [V, H], bias [V] or None, labels [batch, seq])``, random, with
    about ``masked_fraction`` of the labels -100; the float tensors require grad."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=generator).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=generator).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < masked_fraction] = -100
    return hidden, weight, bias, labels


class MatmulCounter(TorchDispatchMode):
    """Counts the FLOPs of every matrix multiply; records every op's name and output shapes, and the
    largest output any op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.matmul_flops = 0
        self.largest_output = 0
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            left, right = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.matmul_flops += 2 * left.shape[0] * left.shape[1] * right.shape[1]
        out = func(*args, **kwargs)
        tensors = [
            t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)
        ]
        self.ops.append((name, tuple(tuple(t.shape) for t in tensors)))
        self.largest_output = max([self.largest_output, *(t.numel() for t in tensors)])
        return out


def leave_process_group(accelerator) -> None:
    """End a 2-rank test script: every rank leaves the process group after the others, then exits at once.

    An unclean or staggered exit sometimes hangs or aborts gloo at shutdown, and freeing the trainer's
    locals (DDP reducer, gloo state) hung about one run in ten in C code after the script's last line:
    each rank leaves with os._exit once its results are written, no finalizers run.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
