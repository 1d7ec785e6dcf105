"""Side-by-side forward+backward of the causal-LM loss from hidden states: time and peak extra memory.

Implementations, each run in its own subprocess (so that one's allocator state and peak memory cannot
leak into another's numbers), in a rotating order from one case to the next:

- ``ours``: ``hf_shift_loss.fused.fused_linear_cross_entropy`` (trained positions only, chunked, the
  gradients computed in the forward pass).
- ``trl_trained``: TRL 1.16's fused-head function (``trl.kernels.ChunkedLogProbFunction``, what
  ``trl.trainer.utils.add_fused_lm_head`` calls) on the trained positions only: what TRL does where
  Triton runs (CUDA/XPU: ``hidden_states[mask]``).
- ``trl_all``: the same function on every position (labels clamped, masked afterwards): what TRL does
  everywhere else, CPU included. Both are called as ``add_fused_lm_head`` calls them (shift by slicing,
  TRL's vocabulary chunk ``_CHUNKED_LOGPROB_CHUNK_SIZE``, ``masked_scatter``/``masked_fill`` back to the
  label shape, ``-sum / count``); TRL is imported as a library, nothing of it is copied here.
- ``torch``: ``torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions(batch_chunk_size=256))``,
  the chunked path of PyTorch (processes every position; untrained ones are ignore_index). Its "auto"
  chunking picks one-row chunks on CPU at these shapes, 4-40x slower; 256-row chunks are set instead.
- ``transformers``: ``logits = F.linear(hidden, weight)`` then ``transformers.loss.loss_utils.ForCausalLMLoss``
  (full ``[tokens, vocab]`` logits, upcast to float32 as transformers does).

Settings: 0 % / 50 % / 90 % of positions masked (label -100 on the start of every row, like a prompt),
float32 and bfloat16, V = 32000 and 128256, a trainable and a frozen head (``weight.requires_grad``).

Peak extra memory: on CPU the resident-set high-water mark during one forward+backward minus the resident
set after the inputs are allocated (``/proc/self/clear_refs`` resets the mark; a fresh process's
``ru_maxrss`` otherwise); on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated memory before.
It includes the gradients that every implementation returns (wrt hidden, and wrt weight when the head
trains); "workspace" is the peak minus those gradients.

Usage::

    python benchmarks/bench_loss.py            # the matrix (~15 min on 2 CPU cores); writes
                                               # benchmarks/results_loss.json, docs/performance.md's section
                                               # and docs/img/bench_loss.png
    python benchmarks/bench_loss.py --quick    # small shapes, a smoke test (does not touch the docs)
    python benchmarks/bench_loss.py --from-json benchmarks/results_loss.json   # rewrite the docs only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_common import loadavg, reset_peak_rss, resident_bytes, write_section

REPO = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("ours", "trl_trained", "trl_all", "torch", "transformers")
REFERENCE = "trl_trained"  # ratios are against TRL's function (both ways)
SECTION_HEADING = "## Loss: fused linear + cross-entropy"
SEQUENCE_LENGTH = 1024  # tokens per row; a masked fraction masks the start (the prompt) of every row
MASKED_FRACTIONS = (0.0, 0.5, 0.9)
TORCH_BATCH_CHUNK = 256  # rows per chunk of torch's linear_cross_entropy (see make_loss_fn)
# Targets of issue 9 on CPU: ours <= 0.6x TRL's time and <= 0.15x its peak extra memory.
TIME_TARGET, MEMORY_TARGET = 0.6, 0.15


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


def make_loss_fn(case: Case, implementation: str, hidden, weight, labels, trl_chunk_size: int):
    """A closure computing the scalar mean loss over the trained tokens of ``labels`` (shifted)."""
    import torch
    import torch.nn.functional as F

    if implementation == "transformers":
        from transformers.loss.loss_utils import ForCausalLMLoss

        def loss_fn() -> torch.Tensor:
            return ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=case.vocab_size)

    elif implementation == "torch":
        from torch.nn import LinearCrossEntropyOptions

        from hf_shift_loss.loss import shift_labels

        # PyTorch's "auto" chunking picks one-row chunks on CPU at these shapes (a scatter_add_ per row: 5.8 s
        # per step at 1024 x 512 x 32k, ~60 s at 512 x 256 x 128k, against ~1.4 s with 256-row chunks), so its
        # documented batch_chunk_size option is set to 256 rows.
        options = LinearCrossEntropyOptions(batch_chunk_size=TORCH_BATCH_CHUNK)
        targets = shift_labels(labels).reshape(-1)

        def loss_fn() -> torch.Tensor:
            return F.linear_cross_entropy(
                hidden.reshape(-1, case.hidden_size), weight, targets, ignore_index=-100, options=options
            )

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
                rows, targets = hidden_states.reshape(-1, case.hidden_size), shifted.clamp(min=0).reshape(-1)
            log_probs = ChunkedLogProbFunction.apply(
                rows, weight, None, targets, 1.0, trl_chunk_size, None, 1.0, ("log_probs",)
            )[0]
            if compact:
                log_probs = log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
            else:
                log_probs = log_probs.view(mask.shape).masked_fill(~mask, 0)
            return -log_probs.sum() / mask.sum().clamp(min=1)

    elif implementation == "ours":
        from hf_shift_loss.fused import fused_linear_cross_entropy

        def loss_fn() -> torch.Tensor:
            return fused_linear_cross_entropy(hidden, weight, labels)

    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    return loss_fn


def _import_loss_modules_only() -> None:
    """Make ``hf_shift_loss.fused``/``.loss`` importable without the package's ``__init__``.

    They need only torch; the package's ``__init__`` imports the trainer (transformers' Trainer, datasets,
    ...), seconds of start-up in each of the ~120 worker processes. Nothing measured is affected.
    """
    import types

    if "hf_shift_loss" not in sys.modules:
        package = types.ModuleType("hf_shift_loss")
        package.__path__ = [str(REPO / "hf_shift_loss")]
        sys.modules["hf_shift_loss"] = package


def run_worker(case: Case, implementation: str, repetitions: int, trl_chunk_size: int) -> Measurement:
    import torch

    sys.path.insert(0, str(REPO))
    _import_loss_modules_only()
    device = torch.device(case.device)
    dtype = getattr(torch, case.dtype)
    generator = torch.Generator().manual_seed(0)
    seq = min(SEQUENCE_LENGTH, case.tokens)
    rows = max(1, case.tokens // seq)
    hidden = torch.randn(rows, seq, case.hidden_size, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(case.vocab_size, case.hidden_size, generator=generator) * 0.02).to(device, dtype)
    weight.requires_grad_(case.head == "trainable")
    labels = torch.randint(0, case.vocab_size, (rows, seq), generator=generator).to(device)
    labels[:, : int(seq * case.masked_fraction)] = -100
    loss_fn = make_loss_fn(case, implementation, hidden, weight, labels, trl_chunk_size)

    cpu_seconds = []
    last_loss = []

    def step() -> float:
        hidden.grad = None
        weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_fn()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        cpu_seconds.append(time.process_time() - cpu_start)
        last_loss[:] = [float(loss.detach())]
        return seconds

    # Memory of one step, measured from the first step (cold: includes what a first call allocates).
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak_extra = torch.cuda.max_memory_allocated() - baseline
    else:
        baseline = resident_bytes("VmRSS")
        if reset_peak_rss():
            step()
            peak_extra = resident_bytes("VmHWM") - baseline
        else:
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            step()
            peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    cpu_seconds.clear()
    seconds = [step() for _ in range(repetitions)]
    return Measurement(
        implementation,
        statistics.median(seconds),
        seconds,
        statistics.median(cpu_seconds),
        peak_extra,
        last_loss[0],
        loadavg(),
        torch.get_num_threads(),
    )


# ---------------------------------------------------------------------------------------------- driver


def trl_chunk_size() -> int:
    """TRL's vocabulary chunk for its fused head, read from TRL (a dev/benchmark dependency)."""
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    return int(_CHUNKED_LOGPROB_CHUNK_SIZE)


def measure(case: Case, implementation: str, repetitions: int, chunk: int) -> Measurement:
    spec = {
        "case": asdict(case),
        "implementation": implementation,
        "repetitions": repetitions,
        "chunk": chunk,
    }
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{implementation} on {case} failed:\n{result.stderr[-3000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


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


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def shape_label(case: Case) -> str:
    return f"{case.tokens} × {case.hidden_size} × {case.vocab_size // 1000}k"


def markdown_table(results: list[tuple[Case, dict[str, Measurement]]]) -> str:
    """One row per case and implementation; ratios against TRL's function on the trained rows and on all."""
    lines = [
        "| N × H × V | head | dtype | masked | implementation | time (s) | CPU time (s) "
        "| peak extra (MiB) | workspace (MiB) | time / TRL trained | CPU time / TRL trained "
        "| memory / TRL trained | time / TRL all | CPU time / TRL all | memory / TRL all | loss |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, measured in results:
        trained, every = measured["trl_trained"], measured["trl_all"]
        for name in implementations_for(case):
            m = measured[name]
            lines.append(
                f"| {shape_label(case)} | {case.head} | {case.dtype} | {case.masked_fraction:.0%} | {name} "
                f"| {m.seconds_median:.2f} | {m.cpu_seconds_median:.2f} | {m.peak_extra_bytes / 2**20:.0f} "
                f"| {workspace_bytes(case, m) / 2**20:.0f} "
                f"| {_ratio(m.seconds_median, trained.seconds_median)} "
                f"| {_ratio(m.cpu_seconds_median, trained.cpu_seconds_median)} "
                f"| {_ratio(m.peak_extra_bytes, trained.peak_extra_bytes)} "
                f"| {_ratio(m.seconds_median, every.seconds_median)} "
                f"| {_ratio(m.cpu_seconds_median, every.cpu_seconds_median)} "
                f"| {_ratio(m.peak_extra_bytes, every.peak_extra_bytes)} | {m.loss:.4f} |"
            )
    return "\n".join(lines)


def ratio_table(results: list[tuple[Case, dict[str, Measurement]]]) -> str:
    """Ours against TRL's function, one row per case, with the targets marked."""
    lines = [
        "| N × H × V | head | dtype | masked | CPU time / TRL trained | time / TRL trained "
        "| memory / TRL trained | workspace / TRL trained | CPU time / TRL all | memory / TRL all "
        f"| time ≤ {TIME_TARGET} | memory ≤ {MEMORY_TARGET} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for case, measured in results:
        ours, trained, every = measured["ours"], measured["trl_trained"], measured["trl_all"]
        cpu = ours.cpu_seconds_median / trained.cpu_seconds_median
        memory = ours.peak_extra_bytes / trained.peak_extra_bytes
        workspace = _ratio(workspace_bytes(case, ours), workspace_bytes(case, trained))
        lines.append(
            f"| {shape_label(case)} | {case.head} | {case.dtype} | {case.masked_fraction:.0%} | {cpu:.2f} "
            f"| {_ratio(ours.seconds_median, trained.seconds_median)} | {memory:.2f} | {workspace} "
            f"| {_ratio(ours.cpu_seconds_median, every.cpu_seconds_median)} "
            f"| {_ratio(ours.peak_extra_bytes, every.peak_extra_bytes)} "
            f"| {'yes' if cpu <= TIME_TARGET else '**no**'} | {'yes' if memory <= MEMORY_TARGET else '**no**'} |"
        )
    return "\n".join(lines)


def plot(results: list[tuple[Case, dict[str, Measurement]]], path: Path) -> None:
    """Ours / TRL (trained rows) per case: CPU time and peak extra memory, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = [(c, m) for c, m in results if c.group == "matrix"]
    labels = [
        f"{c.vocab_size // 1000}k {c.head[:5]} {'bf16' if c.dtype == 'bfloat16' else 'fp32'} "
        f"{c.masked_fraction:.0%}"
        for c, _ in matrix
    ]
    figure, (time_axis, memory_axis) = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True)
    width = 0.2
    for offset, name in enumerate(("ours", "trl_all", "torch", "transformers")):
        positions = [i + (offset - 1.5) * width for i in range(len(matrix))]
        time_axis.bar(
            positions,
            [m[name].cpu_seconds_median / m["trl_trained"].cpu_seconds_median for _, m in matrix],
            width,
            label=name,
        )
        memory_axis.bar(
            positions,
            [m[name].peak_extra_bytes / m["trl_trained"].peak_extra_bytes for _, m in matrix],
            width,
            label=name,
        )
    time_axis.axhline(TIME_TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TIME_TARGET}")
    memory_axis.axhline(
        MEMORY_TARGET, color="black", linestyle="--", linewidth=1, label=f"target {MEMORY_TARGET}"
    )
    time_axis.axhline(1.0, color="grey", linewidth=0.8)
    memory_axis.axhline(1.0, color="grey", linewidth=0.8)
    time_axis.set_title("CPU time of forward+backward / TRL's fused head on the trained rows (log scale)")
    memory_axis.set_title("peak extra memory / TRL's fused head on the trained rows (log scale)")
    for axis in (time_axis, memory_axis):
        axis.set_yscale("log")
        axis.legend(fontsize=7, ncol=6)
    memory_axis.set_xticks(range(len(matrix)), labels, fontsize=7, rotation=60, ha="right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def section_text(saved: dict, results: list[tuple[Case, dict[str, Measurement]]], analysis: str) -> str:
    matrix = [(c, m) for c, m in results if c.group == "matrix"]
    headline = [(c, m) for c, m in results if c.group == "headline"]
    shapes = ", ".join(sorted({shape_label(c) for c, _ in matrix}, reverse=True))
    headline_text = ""
    if headline:
        headline_text = f"""
The issue's own shape (4096 × 1024 × 32k, 50 % masked, trainable head), ours and TRL's function only:

{ratio_table(headline)}

{markdown_table(headline)}
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

{markdown_table(matrix)}

</details>

"""


def device_description() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cores = os.cpu_count()
    return f"CPU ({platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__})"


def load_results(path: Path) -> tuple[dict, list[tuple[Case, dict[str, Measurement]]]]:
    saved = json.loads(path.read_text())
    results = [
        (Case(**entry["case"]), {name: Measurement(**m) for name, m in entry["measured"].items()})
        for entry in saved["results"]
    ]
    return saved, results


def write_docs(saved: dict, results: list[tuple[Case, dict[str, Measurement]]]) -> None:
    """Rewrite this benchmark's section of docs/performance.md and its plot."""
    analysis = saved.get("analysis", "")
    write_section(REPO / "docs" / "performance.md", SECTION_HEADING, section_text(saved, results, analysis))
    plot(results, REPO / "docs" / "img" / "bench_loss.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes; prints the tables only")
    parser.add_argument("--repetitions", type=int, default=1, help="timed steps after the warm-up (matrix)")
    parser.add_argument("--headline-repetitions", type=int, default=2)
    parser.add_argument("--no-headline", action="store_true", help="skip the issue's 4096 x 1024 x 32k shape")
    parser.add_argument("--from-json", type=Path, help="rewrite the docs from saved results, measure nothing")
    parser.add_argument("--resume", type=Path, help="reuse the cases measured in this partial results file")
    parser.add_argument("--remeasure", default="", help="with --resume: implementations measured again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        measurement = run_worker(
            Case(**spec["case"]), spec["implementation"], spec["repetitions"], spec["chunk"]
        )
        print(json.dumps(asdict(measurement)))
        return

    results_json = REPO / "benchmarks" / "results_loss.json"
    if args.from_json:
        saved, results = load_results(args.from_json)
        write_docs(saved, results)
        return

    chunk = trl_chunk_size()
    started, load_before = time.perf_counter(), loadavg()
    print(f"load average before: {load_before}; TRL vocabulary chunk {chunk}", flush=True)
    results = []
    resumed = {}
    if args.resume:
        for entry in json.loads(args.resume.read_text()):
            remeasure = set(args.remeasure.split(","))
            kept = {n: Measurement(**m) for n, m in entry["measured"].items() if n not in remeasure}
            resumed[json.dumps(entry["case"], sort_keys=True)] = kept
    for index, case in enumerate(cases_to_run(args.quick, not args.no_headline)):
        names = implementations_for(case)
        order = names[index % len(names) :] + names[: index % len(names)]  # rotate: no fixed first/last
        measured = dict(resumed.get(json.dumps(asdict(case), sort_keys=True), {}))
        for implementation in order:
            if implementation in measured:
                continue
            repetitions = args.headline_repetitions if case.group == "headline" else args.repetitions
            m = measure(case, implementation, repetitions, chunk)
            measured[implementation] = m
            print(
                f"{case} {implementation}: {m.seconds_median:.2f}s cpu {m.cpu_seconds_median:.2f}s "
                f"{m.peak_extra_bytes / 2**20:.0f} MiB loss={m.loss:.6f} load {m.loadavg}",
                flush=True,
            )
        measured = {name: measured[name] for name in names}
        # Every implementation returns a float32 loss but torch's linear_cross_entropy, whose bfloat16 loss
        # is accumulated in bfloat16 (0.1-0.6 % off in the matrix, 13 % at H = 128 in --quick): it is recorded, not checked.
        reference = measured["transformers" if "transformers" in measured else "trl_trained"].loss
        tolerance = 1e-3 if case.dtype == "float32" else 1e-2
        for name, m in measured.items():
            m.extra["loss_relative_error"] = abs(m.loss - reference) / abs(reference)
            if m.extra["loss_relative_error"] > tolerance and not (
                name == "torch" and case.dtype != "float32"
            ):
                raise RuntimeError(f"{name} disagrees on the loss for {case}: {m.loss} vs {reference}")
        results.append((case, measured))
        partial = [
            {"case": asdict(c), "measured": {n: asdict(m) for n, m in ms.items()}} for c, ms in results
        ]
        Path(os.environ.get("BENCH_LOSS_PARTIAL", "/tmp/bench_loss_partial.json")).write_text(
            json.dumps(partial)
        )

    print(ratio_table(results))
    print(markdown_table([r for r in results if r[0].group == "matrix"]))
    print(f"{time.perf_counter() - started:.0f} s; load average after: {loadavg()}")
    if not args.quick:
        previous = json.loads(results_json.read_text()) if results_json.exists() else {}
        saved = {
            "device": device_description(),
            "repetitions": args.repetitions,
            "headline_repetitions": args.headline_repetitions,
            "trl_chunk_size": chunk,
            "torch_batch_chunk_size": TORCH_BATCH_CHUNK,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "seconds": round(time.perf_counter() - started),
            "analysis": previous.get("analysis", ""),  # written by hand, kept across runs
            "results": [
                {"case": asdict(c), "measured": {n: asdict(m) for n, m in ms.items()}} for c, ms in results
            ],
        }
        results_json.write_text(json.dumps(saved, indent=1) + "\n")
        write_docs(saved, results)


if __name__ == "__main__":
    main()
