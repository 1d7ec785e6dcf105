"""Side-by-side forward+backward of the causal-LM loss from hidden states: time and peak extra memory.

Ours, TRL's fused head on the trained rows and on all rows, torch's chunked ``linear_cross_entropy`` and
transformers' loss on full logits, each in its own process; what is measured and how:
benchmarks/README.md.

Usage::

    python benchmarks/bench_loss.py            # the matrix (~15 min on 2 CPU cores); writes
                                               # benchmarks/results_loss.json, docs/performance.md's section
                                               # and docs/img/bench_loss.png
    python benchmarks/bench_loss.py --quick    # small shapes, a smoke test (does not touch the docs)
    python benchmarks/bench_loss.py --from-json benchmarks/results_loss.json   # rewrite the docs only
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import (
    REPO,
    command_line,
    device_description,
    grouped_bars,
    import_loss_modules_only,
    loadavg,
    loss_inputs,
    markdown_table,
    measure_steps,
    ratio,
    run_worker,
    save_figure,
    save_results,
    serve_worker,
    subplots,
    write_section,
)

IMPLEMENTATIONS = ("ours", "trl_trained", "trl_all", "torch", "transformers")
REFERENCE = "trl_trained"  # ratios are against TRL's function (both ways)
SECTION_HEADING = "## Loss: fused linear + cross-entropy"
MASKED_FRACTIONS = (0.0, 0.5, 0.9)
TORCH_BATCH_CHUNK = 256  # rows per chunk of torch's linear_cross_entropy (see make_loss_fn)
# Targets of issue 9 on CPU: ours <= 0.6x TRL's time and <= 0.15x its peak extra memory.
TIME_TARGET, MEMORY_TARGET = 0.6, 0.15
RESULTS_JSON = REPO / "benchmarks" / "results_loss.json"


@dataclass
class Case:
    tokens: int
    hidden_size: int
    vocab_size: int
    masked_fraction: float
    dtype: str
    device: str
    head: str = "trainable"  # or "frozen": weight.requires_grad is False (LoRA, frozen tied embeddings)
    group: str = "matrix"  # "matrix" or "headline" (the issue's own shape)


@dataclass
class Measurement:
    implementation: str
    seconds_median: float
    seconds_all: list[float]
    cpu_seconds_median: float
    peak_extra_bytes: int
    loss: float
    loadavg: str = ""
    threads: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- worker


def make_loss_fn(implementation: str, hidden, weight, labels, trl_chunk_size: int):
    """A closure computing the scalar mean loss over the trained tokens of ``labels`` (shifted), from
    ``hidden [rows, seq, H]`` and ``weight [V, H]``. ``liger`` and ``cce`` (Liger-Kernel's and
    cut-cross-entropy's fused linear cross-entropy, Triton kernels) run on CUDA only (gpu_suite.py)."""
    import torch
    import torch.nn.functional as F

    hidden_size, vocab_size = weight.shape[1], weight.shape[0]
    if implementation == "transformers":
        from transformers.loss.loss_utils import ForCausalLMLoss

        def loss_fn() -> torch.Tensor:
            return ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=vocab_size)

    elif implementation in ("torch", "liger", "cce"):
        from hf_shift_loss.loss import shift_labels

        targets = shift_labels(labels).reshape(-1)  # the last position of every row becomes -100: same loss

        def flat() -> torch.Tensor:
            return hidden.reshape(-1, hidden_size)

        if implementation == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss_module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
            return lambda: loss_module(weight, flat(), targets)
        if implementation == "cce":
            from cut_cross_entropy import linear_cross_entropy

            return lambda: linear_cross_entropy(flat(), weight, targets, ignore_index=-100, reduction="mean")
        from torch.nn import LinearCrossEntropyOptions

        # PyTorch's "auto" chunking picks one-row chunks on CPU at these shapes (a scatter_add_ per row: 5.8 s
        # per step at 1024 x 512 x 32k, ~60 s at 512 x 256 x 128k, against ~1.4 s with 256-row chunks), so its
        # documented batch_chunk_size option is set to 256 rows.
        options = LinearCrossEntropyOptions(batch_chunk_size=TORCH_BATCH_CHUNK)

        def loss_fn() -> torch.Tensor:
            return F.linear_cross_entropy(flat(), weight, targets, ignore_index=-100, options=options)

    elif implementation in ("trl_trained", "trl_all"):
        # TRL's function, called the way trl.trainer.utils.add_fused_lm_head calls it (temperature 1, no
        # soft-cap, scale 1, log-probs only); "compact" is its `_use_triton(device)` branch.
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        compact = implementation == "trl_trained"

        def loss_fn() -> torch.Tensor:
            hidden_states, shifted = hidden[:, :-1], labels[:, 1:]
            mask = shifted != -100
            if compact:
                rows, targets = hidden_states[mask], shifted[mask]
            else:
                rows, targets = hidden_states.reshape(-1, hidden_size), shifted.clamp(min=0).reshape(-1)
            log_probs = ChunkedLogProbFunction.apply(
                rows, weight, None, targets, 1.0, trl_chunk_size, None, 1.0, ("log_probs",)
            )[0]
            if compact:
                log_probs = log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
            else:
                log_probs = log_probs.view(mask.shape).masked_fill(~mask, 0)
            return -log_probs.sum() / mask.sum().clamp(min=1)

    elif implementation == "ours":
        from hf_shift_loss.loss import fused_linear_cross_entropy

        def loss_fn() -> torch.Tensor:
            return fused_linear_cross_entropy(hidden, weight, labels)

    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    return loss_fn


def worker(case: dict, implementation: str, repetitions: int, chunk: int) -> dict:
    """One implementation on one case: the memory of the first (cold) step, then ``repetitions`` timed steps."""
    import torch

    import_loss_modules_only()
    c = Case(**case)
    hidden, weight, labels = loss_inputs(
        c.tokens, c.hidden_size, c.vocab_size, c.masked_fraction, c.dtype, c.device, c.head == "trainable"
    )
    m = measure_steps(
        make_loss_fn(implementation, hidden, weight, labels, chunk),
        (hidden, weight),
        c.device,
        0,
        repetitions,
    )
    fields = ("seconds_median", "seconds_all", "cpu_seconds_median", "peak_extra_bytes", "loss")
    return asdict(Measurement(implementation, *(m[f] for f in fields), loadavg(), torch.get_num_threads()))


# ---------------------------------------------------------------------------------------------- driver


def trl_chunk_size() -> int:
    """TRL's vocabulary chunk for its fused head, read from TRL (a dev/benchmark dependency)."""
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    return int(_CHUNKED_LOGPROB_CHUNK_SIZE)


# CPU shapes (tokens N x hidden H x vocabulary V), chosen so that the whole matrix (24 cases x 5
# implementations, a process each) fits in about 15 minutes on 2 shared cores. Both vocabularies get the
# same N*H*V (so the same FLOPs): 128k gets half the tokens and half the hidden size. The issue's own
# shape (4096 x 1024 x 32000, 50 % masked, trainable head) is measured too, for ours and TRL's function
# only ("headline").
CPU_SHAPES = [(1024, 512, 32000), (512, 256, 128256)]
QUICK_SHAPES = [(1024, 128, 8000), (256, 128, 32000)]
HEADLINE_SHAPE = (4096, 1024, 32000)


def cases_to_run(quick: bool, headline: bool) -> list[Case]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = QUICK_SHAPES if quick else CPU_SHAPES
    cases = [
        Case(tokens, hidden_size, vocab, masked, dtype, device, head)
        for tokens, hidden_size, vocab in shapes
        for head in ("trainable", "frozen")
        for dtype in ("float32", "bfloat16")
        for masked in MASKED_FRACTIONS
    ]
    if headline and not quick:
        n, h, v = HEADLINE_SHAPE
        cases = [
            Case(n, h, v, 0.5, dtype, device, "trainable", "headline") for dtype in ("float32", "bfloat16")
        ] + cases
    return cases


def implementations_for(case: Case) -> tuple[str, ...]:
    return ("ours", "trl_trained", "trl_all") if case.group == "headline" else IMPLEMENTATIONS


def gradient_bytes(case: Case) -> int:
    """The gradients every implementation returns: hidden ``[N, H]``, and weight ``[V, H]`` if it trains."""
    element_size = 4 if case.dtype == "float32" else 2
    rows = case.tokens + (case.vocab_size if case.head == "trainable" else 0)
    return rows * case.hidden_size * element_size


def workspace_bytes(case: Case, measurement: Measurement) -> int:
    """Peak extra memory beyond the gradients (never below 0: RSS is measured in pages)."""
    return max(0, measurement.peak_extra_bytes - gradient_bytes(case))


def shape_label(case: Case) -> str:
    return f"{case.tokens} × {case.hidden_size} × {case.vocab_size // 1000}k"


def setting_cells(case: Case) -> list[str]:
    return [shape_label(case), case.head, case.dtype, f"{case.masked_fraction:.0%}"]


def versus(m: Measurement, reference: Measurement, fields: tuple[str, ...]) -> list[str]:
    return [ratio(getattr(m, f), getattr(reference, f)) for f in fields]


TIME_MEMORY = ("seconds_median", "cpu_seconds_median", "peak_extra_bytes")


def results_table(results: list[tuple[Case, dict[str, Measurement]]]) -> str:
    """One row per case and implementation; ratios against TRL's function on the trained rows and on all."""
    headers = ["N × H × V", "head", "dtype", "masked", "implementation", "time (s)", "CPU time (s)"]
    headers += ["peak extra (MiB)", "workspace (MiB)"]
    headers += [f"{q} / TRL {w}" for w in ("trained", "all") for q in ("time", "CPU time", "memory")]
    rows = []
    for case, measured in results:
        for name in implementations_for(case):
            m = measured[name]
            rows.append(
                [*setting_cells(case), name, f"{m.seconds_median:.2f}", f"{m.cpu_seconds_median:.2f}"]
                + [f"{m.peak_extra_bytes / 2**20:.0f}", f"{workspace_bytes(case, m) / 2**20:.0f}"]
                + versus(m, measured["trl_trained"], TIME_MEMORY)
                + versus(m, measured["trl_all"], TIME_MEMORY)
                + [f"{m.loss:.4f}"]
            )
    return markdown_table(headers + ["loss"], rows, "lllrl" + "r" * 11)


def ratio_table(results: list[tuple[Case, dict[str, Measurement]]]) -> str:
    """Ours against TRL's function, one row per case, with the targets marked."""
    headers = ["N × H × V", "head", "dtype", "masked", "CPU time / TRL trained", "time / TRL trained"]
    headers += ["memory / TRL trained", "workspace / TRL trained", "CPU time / TRL all", "memory / TRL all"]
    headers += [f"time ≤ {TIME_TARGET}", f"memory ≤ {MEMORY_TARGET}"]
    rows = []
    for case, measured in results:
        ours, trained, every = measured["ours"], measured["trl_trained"], measured["trl_all"]
        cpu = ours.cpu_seconds_median / trained.cpu_seconds_median
        memory = ours.peak_extra_bytes / trained.peak_extra_bytes
        rows.append(
            [*setting_cells(case), f"{cpu:.2f}", ratio(ours.seconds_median, trained.seconds_median)]
            + [f"{memory:.2f}", ratio(workspace_bytes(case, ours), workspace_bytes(case, trained))]
            + versus(ours, every, TIME_MEMORY[1:])
            + ["yes" if cpu <= TIME_TARGET else "**no**", "yes" if memory <= MEMORY_TARGET else "**no**"]
        )
    return markdown_table(headers, rows, "lllr" + "r" * 6 + "cc")


def plot(results: list[tuple[Case, dict[str, Measurement]]], path: Path) -> None:
    """Ours / TRL (trained rows) per case: CPU time and peak extra memory, with the targets."""
    matrix = [m for c, m in results if c.group == "matrix"]
    labels = [
        f"{c.vocab_size // 1000}k {c.head[:5]} {'bf16' if c.dtype == 'bfloat16' else 'fp32'} "
        f"{c.masked_fraction:.0%}"
        for c, _ in results
        if c.group == "matrix"
    ]
    figure, axes = subplots(2, 1, figsize=(13, 7.5), sharex=True)
    panels = (
        (
            "cpu_seconds_median",
            TIME_TARGET,
            "CPU time of forward+backward / TRL's fused head on the trained rows",
        ),
        ("peak_extra_bytes", MEMORY_TARGET, "peak extra memory / TRL's fused head on the trained rows"),
    )
    for axis, (key, target, title) in zip(axes, panels, strict=True):
        names = ("ours", "trl_all", "torch", "transformers")
        grouped_bars(
            axis,
            {n: [getattr(m[n], key) / getattr(m["trl_trained"], key) for m in matrix] for n in names},
            0.2,
        )
        axis.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_title(f"{title} (log scale)")
        axis.set_yscale("log")
        axis.legend(fontsize=7, ncol=6)
    axes[1].set_xticks(range(len(matrix)), labels, fontsize=7, rotation=60, ha="right")
    save_figure(figure, path)


def section_text(saved: dict, results: list[tuple[Case, dict[str, Measurement]]], analysis: str) -> str:
    matrix = [(c, m) for c, m in results if c.group == "matrix"]
    headline = [(c, m) for c, m in results if c.group == "headline"]
    shapes = ", ".join(sorted({shape_label(c) for c, _ in matrix}, reverse=True))
    headline_text = ""
    if headline:
        headline_text = f"""
The issue's own shape (4096 × 1024 × 32k, 50 % masked, trainable head), ours and TRL's function only:

{ratio_table(headline)}

{results_table(headline)}
"""
    return f"""{SECTION_HEADING}

`fused_linear_cross_entropy(hidden, lm_head.weight, labels)` against TRL 1.16's fused LM head function
(`trl.kernels.ChunkedLogProbFunction`, what `add_fused_lm_head` and so `SFTTrainer` run), called as
`add_fused_lm_head` calls it, both ways: on the trained rows only (`trl_trained`, what TRL does on
CUDA/XPU, where Triton runs) and on every row (`trl_all`, what TRL does on CPU and every other device);
PyTorch's chunked `torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions(batch_chunk_size=256))`
(`torch`; its default "auto" chunking picks one-row chunks on this CPU: 5.8 s per step at 1024 × 512 ×
32k and about 60 s at 512 × 256 × 128k, against about 1.4 s with 256-row chunks); and transformers' own loss on full logits (`ForCausalLMLoss(F.linear(hidden, weight), labels)`,
float32 upcast; `transformers`). Forward + backward (gradients wrt hidden, and wrt the weight when the
head trains), each implementation in its own process, implementations in a rotating order.
Time: {saved["repetitions"]} timed step(s) after a warm-up step (median of
{saved.get("headline_repetitions", saved["repetitions"])} for the headline), wall clock and the CPU time of the
process; **the ratios use CPU time**, which a shared machine disturbs less (load average
{saved.get("loadavg_before", "?")} before, {saved.get("loadavg_after", "?")} after). Peak extra memory: the resident-set high-water mark of the warm-up step minus the memory
holding the inputs; it includes the gradients every implementation returns ((N + V) · H elements with a
trainable head, N · H frozen); "workspace" is what is left: what the loss itself costs.
"masked": the fraction of positions whose label is -100 (the start of every 1024-token row, like a
prompt). Reproduce with `python benchmarks/bench_loss.py` (results: `benchmarks/results_loss.json`).

Shapes (N × H × V): {shapes} (the same N · H · V, so the same FLOPs: 128k gets half the tokens and
half the hidden size, so that 24 settings × 5 implementations, 120 processes, run in
{saved.get("seconds", 0) / 60:.0f} minutes on this CPU), and the issue's 4096 × 1024 × 32k for the
headline. {saved.get("passes", "")} Measured on {saved["device"]}.

Ours against TRL's function (targets on CPU: ≤ {TIME_TARGET}× its time and ≤ {MEMORY_TARGET}× its memory):

{ratio_table(matrix)}
{headline_text}
{analysis}

![ours and the others against TRL's fused head](img/bench_loss.png)

<details><summary>All implementations, all settings</summary>

{results_table(matrix)}

</details>

"""


def load_results(path: Path) -> tuple[dict, list[tuple[Case, dict[str, Measurement]]]]:
    saved = json.loads(path.read_text())
    results = [
        (Case(**entry["case"]), {name: Measurement(**m) for name, m in entry["measured"].items()})
        for entry in saved["results"]
    ]
    return saved, results


def as_json(results: list[tuple[Case, dict[str, Measurement]]]) -> list[dict]:
    return [{"case": asdict(c), "measured": {n: asdict(m) for n, m in ms.items()}} for c, ms in results]


def write_docs(saved: dict, results: list[tuple[Case, dict[str, Measurement]]]) -> None:
    """Rewrite this benchmark's section of docs/performance.md and its plot."""
    write_section(SECTION_HEADING, section_text(saved, results, saved.get("analysis", "")))
    plot(results, REPO / "docs" / "img" / "bench_loss.png")


def check_losses(case: Case, measured: dict[str, Measurement]) -> None:
    """Every implementation agrees on the loss, but torch's in bfloat16: it returns a loss accumulated in
    bfloat16 (0.1-0.6 % off in the matrix, 13 % at H = 128 in --quick), recorded, not checked."""
    reference = measured["transformers" if "transformers" in measured else "trl_trained"].loss
    tolerance = 1e-3 if case.dtype == "float32" else 1e-2
    for name, m in measured.items():
        m.extra["loss_relative_error"] = abs(m.loss - reference) / abs(reference)
        if m.extra["loss_relative_error"] > tolerance and not (name == "torch" and case.dtype != "float32"):
            raise RuntimeError(f"{name} disagrees on the loss for {case}: {m.loss} vs {reference}")


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes; prints the tables only")
    parser.add_argument("--repetitions", type=int, default=1, help="timed steps after the warm-up (matrix)")
    parser.add_argument("--headline-repetitions", type=int, default=2)
    parser.add_argument("--no-headline", action="store_true", help="skip the issue's 4096 x 1024 x 32k shape")
    parser.add_argument("--resume", type=Path, help="reuse the cases measured in this partial results file")
    parser.add_argument("--remeasure", default="", help="with --resume: implementations measured again")
    args = parser.parse_args()
    if args.from_json:
        write_docs(*load_results(args.from_json))
        return

    chunk = trl_chunk_size()
    started, load_before = time.perf_counter(), loadavg()
    print(f"load average before: {load_before}; TRL vocabulary chunk {chunk}", flush=True)
    results = []
    resumed = {}
    for entry in json.loads(args.resume.read_text()) if args.resume else []:
        remeasure = set(args.remeasure.split(","))
        kept = {n: Measurement(**m) for n, m in entry["measured"].items() if n not in remeasure}
        resumed[json.dumps(entry["case"], sort_keys=True)] = kept
    for index, case in enumerate(cases_to_run(args.quick, not args.no_headline)):
        names = implementations_for(case)
        order = names[index % len(names) :] + names[: index % len(names)]  # rotate: no fixed first/last
        measured = dict(resumed.get(json.dumps(asdict(case), sort_keys=True), {}))
        repetitions = args.headline_repetitions if case.group == "headline" else args.repetitions
        for implementation in (name for name in order if name not in measured):
            spec = {"case": asdict(case), "implementation": implementation, "repetitions": repetitions}
            m = measured[implementation] = Measurement(**run_worker(__file__, spec | {"chunk": chunk}))
            print(
                f"{case} {implementation}: {m.seconds_median:.2f}s cpu {m.cpu_seconds_median:.2f}s "
                f"{m.peak_extra_bytes / 2**20:.0f} MiB loss={m.loss:.6f} load {m.loadavg}",
                flush=True,
            )
        measured = {name: measured[name] for name in names}
        check_losses(case, measured)
        results.append((case, measured))
        partial = Path(os.environ.get("BENCH_LOSS_PARTIAL", "/tmp/bench_loss_partial.json"))
        partial.write_text(json.dumps(as_json(results)))

    print(ratio_table(results))
    print(results_table([r for r in results if r[0].group == "matrix"]))
    print(f"{time.perf_counter() - started:.0f} s; load average after: {loadavg()}")
    if not args.quick:
        saved = {
            "device": device_description(),
            "repetitions": args.repetitions,
            "headline_repetitions": args.headline_repetitions,
            "trl_chunk_size": chunk,
            "torch_batch_chunk_size": TORCH_BATCH_CHUNK,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "seconds": round(time.perf_counter() - started),
            "results": as_json(results),
        }
        write_docs(save_results(RESULTS_JSON, saved), results)


if __name__ == "__main__" and not serve_worker(worker):
    main()
