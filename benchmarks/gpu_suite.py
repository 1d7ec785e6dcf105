"""The GPU suite: fused-loss correctness in bf16, the fused heads side by side, one step of the default recipe.

One script, under 8 minutes on one H100; what it checks and measures: benchmarks/README.md.

Usage::

    python benchmarks/gpu_suite.py                          # on a CUDA machine: full sizes,
                                                            # writes benchmarks/results_gpu.json
    python benchmarks/gpu_suite.py --device cpu --small     # CPU smoke run (tiny sizes), ~30 s
    python benchmarks/gpu_suite.py --json out.json --skip-recipe
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_loss import make_loss_fn, trl_chunk_size
from harness import (
    REPO,
    command_line,
    device_description,
    import_loss_modules_only,
    loss_inputs,
    markdown_table,
    measure_steps,
    run_command,
)

FULL_SHAPE = (16384, 4096, 128256)  # N tokens, H, V
SMALL_SHAPE = (512, 64, 2000)
FULL_CORRECTNESS_SHAPE = (4096, 2048, 32000)
SMALL_CORRECTNESS_SHAPE = (256, 32, 500)
CUDA_ONLY = {
    "liger": "Liger-Kernel's fused linear cross-entropy is a Triton kernel: CUDA only",
    "cce": "cut-cross-entropy's kernels are Triton kernels: CUDA only",
}
INSTALL = {"liger": "pip install liger-kernel==0.8.5", "cce": "pip install cut-cross-entropy==25.1.1"}


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------- 1. correctness


def correctness(device: str, small: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from hf_shift_loss.loss import causal_lm_loss, fused_linear_cross_entropy

    tokens, hidden_size, vocab = SMALL_CORRECTNESS_SHAPE if small else FULL_CORRECTNESS_SHAPE
    hidden32, weight32, labels = loss_inputs(tokens, hidden_size, vocab, 0.5, "float32", device)

    def run(dtype, fused: bool):
        hidden = hidden32.detach().to(dtype, copy=True).requires_grad_()
        weight = weight32.detach().to(dtype, copy=True).requires_grad_()
        if fused:
            loss = fused_linear_cross_entropy(hidden, weight, labels)
        else:
            loss = causal_lm_loss(F.linear(hidden, weight), labels)
        loss.backward()
        return float(loss), hidden.grad.float(), weight.grad.float()

    reference = run(torch.float32, fused=False)
    eager = run(torch.bfloat16, fused=False)
    fused = run(torch.bfloat16, fused=True)

    def errors(result) -> dict:
        return {
            "loss": abs(result[0] - reference[0]) / abs(reference[0]),
            "grad_hidden": float((result[1] - reference[1]).norm() / reference[1].norm()),
            "grad_weight": float((result[2] - reference[2]).norm() / reference[2].norm()),
        }

    eager_errors, fused_errors = errors(eager), errors(fused)
    passed = all(fused_errors[k] <= 2 * eager_errors[k] + 1e-3 for k in fused_errors)
    result = {
        "device": device,
        "shape": [tokens, hidden_size, vocab],
        "loss_float32": reference[0],
        "loss_eager_bf16": eager[0],
        "loss_fused_bf16": fused[0],
        "eager_bf16_error": eager_errors,
        "fused_bf16_error": fused_errors,
        "passed": passed,
    }
    say(
        f"[correctness] {device} bf16 N={tokens} H={hidden_size} V={vocab}: "
        + ", ".join(f"{k} fused {fused_errors[k]:.2e} / eager {eager_errors[k]:.2e}" for k in fused_errors)
        + f" -> {'PASS' if passed else 'FAIL'}"
    )
    return result


# ---------------------------------------------------------------------------------------------- 2. loss benchmark


def implementations(device: str) -> list[str]:
    trl = ["trl_trained"] if device == "cuda" else ["trl_trained", "trl_all"]
    return ["ours", *trl, "liger", "cce", "torch", "transformers"]


def skip_reason(name: str, device: str) -> str | None:
    if name in CUDA_ONLY:
        if device != "cuda":
            return f"skipped: {CUDA_ONLY[name]}; run this suite on a GPU machine"
        module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[name]
        if importlib.util.find_spec(module) is None:
            return f"skipped: {module} is not installed ({INSTALL[name]})"
    return None


def measure_one(name: str, device: str, shape: tuple[int, int, int], repetitions: int, warmup: int) -> dict:
    hidden, weight, labels = loss_inputs(*shape, 0.5, "bfloat16", device)
    try:
        chunk = trl_chunk_size()
    except ImportError:  # TRL not installed: the TRL rows fail with their own message
        chunk = 32768
    loss_fn = make_loss_fn(name, hidden, weight, labels, chunk)
    m = measure_steps(loss_fn, (hidden, weight), device, warmup, repetitions)  # in-process on CPU: indicative
    return {
        "implementation": name,
        "seconds": m["seconds_median"],
        "peak_bytes": m["peak_extra_bytes"],
        "loss": m["loss"],
    }


def loss_benchmark(device: str, small: bool) -> list[dict]:
    shape = SMALL_SHAPE if small else FULL_SHAPE
    repetitions, warmup = (2, 1) if small else (5, 2)
    results = []
    for name in implementations(device):
        reason = skip_reason(name, device)
        if reason is None:
            try:
                result = measure_one(name, device, shape, repetitions, warmup)
            except Exception as error:  # one library failing must not lose the others' numbers
                result = {"implementation": name, "error": f"{type(error).__name__}: {error}"[:500]}
            gc.collect()  # the inputs of the last implementation go before the next allocates its own
            if device == "cuda":
                import torch

                torch.cuda.empty_cache()
        else:
            result = {"implementation": name, "skipped": reason}
        results.append(result)
        if "seconds" in result:
            say(
                f"[loss] {name}: {result['seconds'] * 1e3:.1f} ms, peak {result['peak_bytes'] / 2**20:.0f} MiB, "
                f"loss {result['loss']:.5f}"
            )
        else:
            say(f"[loss] {name}: {result.get('skipped') or result.get('error')}")
    reference = next((r for r in results if r["implementation"] == "trl_trained" and "seconds" in r), None)
    if reference is not None:
        for r in results:
            if "seconds" in r:
                r["time_vs_trl"] = r["seconds"] / reference["seconds"]
                r["memory_vs_trl"] = (
                    r["peak_bytes"] / reference["peak_bytes"] if reference["peak_bytes"] else None
                )
    return results


# ---------------------------------------------------------------------------------------------- 3. recipe step


def recipe_step(device: str, small: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_suite_recipe_") as output_dir:
        options = "--max_steps 1 --logging_steps 1 --sample_max_new_tokens 0 --require_eval_improvement false"
        command = [
            sys.executable,
            str(REPO / "recipes" / "sft.py"),
            *options.split(),
            "--output_dir",
            output_dir,
        ]
        if small:
            command += ["--tiny_random_model", "true", "--max_train_rows", "8", "--eval_rows", "2"]
        if device == "cpu":
            command += ["--use_cpu", "true"]
        start = time.perf_counter()
        completed = run_command(command)
        seconds = time.perf_counter() - start
    lines = completed.stdout.splitlines()
    trained = next((line for line in lines if line.startswith("trained ")), None)
    result = {
        "command": " ".join(command[1:]).replace(output_dir, "<tmp>"),
        "returncode": completed.returncode,
        "seconds": seconds,
        "trained_line": trained,
        "tail": "\n".join((completed.stdout + completed.stderr).splitlines()[-8:])
        if completed.returncode
        else "",
    }
    say(f"[recipe] rc={completed.returncode} in {seconds:.1f} s: {trained or result['tail']}")
    return result


def model_parallel(device: str) -> dict:
    """A model split over devices by ``device_map``, eager and fused loss: the same loss and backbone
    gradients as the model in one piece (relative error < 1e-5 and < 1e-4).

    On CUDA the backbone sits on cuda:0 and the lm_head on cuda:1 with two GPUs, else on the CPU: the
    hidden states, the labels and the gradients cross real devices, which no CPU test can show. On CPU
    (the smoke run) the head is offloaded to disk instead: tests/test_model_parallel.py's check.
    """
    import copy

    import torch
    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_shift_loss.loss import choose_loss_path

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    whole = LlamaForCausalLM(config).to(device)
    if device == "cuda":
        device_map = {"model": 0, "lm_head": 1 if torch.cuda.device_count() > 1 else "cpu"}
    else:
        device_map = {"model": "cpu", "lm_head": "disk"}
    input_ids = torch.randint(3, 1000, (4, 64), device=device)
    labels = input_ids.clone()
    labels[:, :20] = -100

    def loss_and_grads(model, loss_impl: str) -> tuple[torch.Tensor, dict]:
        path = choose_loss_path(model, loss_impl)
        assert path.name == loss_impl, path
        loss = path(model, {"input_ids": input_ids}, labels).loss
        loss.backward()
        parameters = model.named_parameters()
        return loss.detach().cpu(), {n: p.grad.cpu() for n, p in parameters if n.startswith("model.")}

    expected_loss, expected_grads = loss_and_grads(whole, "eager")
    result = {"device_map": {name: str(where) for name, where in device_map.items()}}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_offload_") as offload_dir:
        for loss_impl in ("eager", "fused"):
            split = dispatch_model(copy.deepcopy(whole), device_map=device_map, offload_dir=offload_dir)
            loss, grads = loss_and_grads(split, loss_impl)
            grad_error = max(
                float((grads[name] - grad).norm() / grad.norm().clamp(min=1e-12))
                for name, grad in expected_grads.items()
            )
            result[loss_impl] = {
                "loss_error": float((loss - expected_loss).abs() / expected_loss.abs()),
                "grad_error": grad_error,
            }
    result["passed"] = all(
        result[impl]["loss_error"] < 1e-5 and result[impl]["grad_error"] < 1e-4 for impl in ("eager", "fused")
    )
    say(f"[model parallel] {result}")
    return result


# ---------------------------------------------------------------------------------------------- main


def summary(results: dict) -> str:
    rows = [
        [r["implementation"], f"{r['seconds'] * 1e3:.1f}", f"{r['peak_bytes'] / 2**20:.0f}"]
        + [f"{r['time_vs_trl']:.2f}" if "time_vs_trl" in r else "n/a"]
        + [f"{r['memory_vs_trl']:.2f}" if r.get("memory_vs_trl") is not None else "n/a", f"{r['loss']:.5f}"]
        if "seconds" in r
        else [r["implementation"], r.get("skipped") or r.get("error"), "", "", "", ""]
        for r in results["loss"]
    ]
    headers = ["implementation", "time (ms)", "peak memory (MiB)", "time / TRL", "memory / TRL", "loss"]
    return markdown_table(headers, rows, "lrrrrr")


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__, from_json=False)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--small", action="store_true", help="tiny sizes (the CPU smoke test)")
    parser.add_argument(
        "--json",
        type=Path,
        help="write the results here (default on CUDA, full size: benchmarks/results_gpu.json)",
    )
    parser.add_argument("--skip-recipe", action="store_true")
    args = parser.parse_args(argv)

    import torch

    import_loss_modules_only()  # the loss modules without the trainer: a faster start
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_suite: --device cuda but torch sees no CUDA device; use --device cpu --small",
            file=sys.stderr,
        )
        return 2
    if device == "cpu" and not args.small:
        say("gpu_suite: full sizes on CPU take very long; add --small for the smoke run")
    started = time.perf_counter()
    name = device_description(device)
    say(f"gpu_suite on {name}, torch {torch.__version__}, {'small' if args.small else 'full'} sizes")
    results = {
        "device": name,
        "torch": torch.__version__,
        "small": args.small,
        "shape": list(SMALL_SHAPE if args.small else FULL_SHAPE),
        "correctness": correctness(device, args.small),
        "loss": loss_benchmark(device, args.small),
        "model_parallel": model_parallel(device),
    }
    if args.skip_recipe:
        results["recipe"] = {"skipped": "--skip-recipe"}
    else:
        results["recipe"] = recipe_step(device, args.small)
    results["seconds"] = time.perf_counter() - started
    say(summary(results))
    say(f"gpu_suite: {results['seconds']:.0f} s")
    path = args.json
    if path is None and device == "cuda" and not args.small:
        path = REPO / "benchmarks" / "results_gpu.json"
    if path is not None:
        path.write_text(json.dumps(results, indent=1) + "\n")
    failed = not results["correctness"]["passed"] or results["recipe"].get("returncode", 0) != 0
    failed = failed or not results["model_parallel"]["passed"]
    failed = failed or any("error" in r for r in results["loss"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
