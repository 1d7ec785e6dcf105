"""The sync-free fused loss under torch.compile against the eager fused loss: forward+backward time and memory.

What is measured and how: benchmarks/README.md.

Usage::

    python benchmarks/bench_compile.py            # N=2048, H=1024, V=32000, 0% and 50% masked; writes
                                                  # results_compile.json and its section of docs/performance.md
    python benchmarks/bench_compile.py --quick    # small shapes, prints only
    python benchmarks/bench_compile.py --from-json benchmarks/results_compile.json   # rewrite the docs only
"""

from __future__ import annotations

import json

from harness import (
    REPO,
    command_line,
    device_description,
    import_loss_modules_only,
    loss_inputs,
    markdown_table,
    measure_steps,
    run_worker,
    save_results,
    serve_worker,
    write_section,
)

IMPLEMENTATIONS = {  # name: its row label in docs/performance.md
    "fused": "default mode (eager)",
    "sync_free": "sync-free, eager",
    "compiled": "sync-free, compiled",
}
SECTION_HEADING = "## Compiled: the sync-free fused loss under torch.compile"
BEFORE_HEADING = "## Packing"  # this section goes before it
RESULTS_JSON = REPO / "benchmarks" / "results_compile.json"
MEASUREMENT_FIELDS = (
    "seconds_median",
    "seconds_all",
    "cpu_seconds_median",
    "warmup_seconds",
    "peak_extra_bytes",
    "loss",
)
# Every allocation over 64 KiB is an mmap, returned to the system when freed (glibc otherwise raises this
# threshold as blocks are freed, and freed memory would stay resident).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def worker(case: dict, implementation: str, repetitions: int) -> dict:
    """One warm-up step (the compilation), the memory of one step, then ``repetitions`` timed steps."""
    import torch

    import_loss_modules_only()
    from hf_shift_loss.loss import fused_linear_cross_entropy

    hidden, weight, labels = loss_inputs(**case, device="cpu")

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, labels, sync_free=implementation != "fused")

    if implementation == "compiled":
        loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False)
    m = measure_steps(
        lambda: loss_fn(hidden, weight, labels), (hidden, weight), "cpu", 1, repetitions, trim=True
    )
    return {"implementation": implementation} | {f: m[f] for f in MEASUREMENT_FIELDS}


def section_text(saved: dict) -> str:
    rows = []
    for entry in saved["results"]:
        case, measured = entry["case"], entry["measured"]
        base, sync_free = measured["fused"], measured["sync_free"]
        shape = f"{case['tokens']} × {case['hidden_size']} × {case['vocab_size'] // 1000}k"
        for name, m in measured.items():
            cpu = m["cpu_seconds_median"]
            rows.append(
                [shape, f"{case['masked_fraction']:.0%}", IMPLEMENTATIONS[name], f"{m['seconds_median']:.2f}"]
                + [f"{cpu:.2f}", f"{m['warmup_seconds']:.1f}", f"{m['peak_extra_bytes'] / 2**20:.0f}"]
                + [f"{cpu / base['cpu_seconds_median']:.2f}", f"{cpu / sync_free['cpu_seconds_median']:.2f}"]
                + [f"{m['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):.2f}"]
            )
    headers = ["N × H × V", "masked", "implementation", "time (s)", "CPU time (s)", "compile / warm-up (s)"]
    headers += [
        "peak extra (MiB)",
        "CPU time / default mode",
        "CPU time / sync-free eager",
        "memory / default mode",
    ]
    return f"""{SECTION_HEADING}

`fused_linear_cross_entropy(..., sync_free=True)` inside `torch.compile(fullgraph=True, dynamic=False)`
(what the trainer runs with `torch_compile=True`, `fused_sync_free` on) against the same call in eager
mode and against the default mode, which projects only the trained rows (a host sync to count them).
Forward + backward, gradients wrt hidden and a trainable weight, float32; each implementation in its
own process; median of {saved["repetitions"]} steps after a warm-up step (the compilation, reported
separately); peak extra memory is the resident-set high-water mark of one step over the memory before
it. {saved["device"]}. Reproduce with `python benchmarks/bench_compile.py`
(results: `benchmarks/results_compile.json`).

{markdown_table(headers, rows, "lrl" + "r" * 7)}

{saved.get("analysis", "")}
"""


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes; prints only")
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    if args.from_json:
        write_section(SECTION_HEADING, section_text(json.loads(args.from_json.read_text())), BEFORE_HEADING)
        return

    tokens, hidden_size, vocab_size = (1024, 256, 8000) if args.quick else (2048, 1024, 32000)
    results = []
    for masked_fraction in (0.5, 0.0):
        case = {"tokens": tokens, "hidden_size": hidden_size, "vocab_size": vocab_size}
        case |= {"masked_fraction": masked_fraction, "dtype": "float32"}
        measured = {}
        for name in IMPLEMENTATIONS:
            spec = {"case": case, "implementation": name, "repetitions": args.repetitions}
            m = measured[name] = run_worker(__file__, spec, WORKER_ENV)
            print(
                f"{case} {name}: {m['seconds_median']:.2f}s (warm-up {m['warmup_seconds']:.1f}s) "
                f"{m['peak_extra_bytes'] / 2**20:.0f} MiB loss={m['loss']:.6f}",
                flush=True,
            )
        losses = [m["loss"] for m in measured.values()]
        if max(losses) - min(losses) > 1e-4 * abs(losses[0]):
            raise RuntimeError(f"implementations disagree on the loss for {case}: {losses}")
        fused = measured["fused"]
        ratios = {
            name: {
                "time_vs_fused": m["seconds_median"] / fused["seconds_median"],
                "memory_vs_fused": m["peak_extra_bytes"] / max(fused["peak_extra_bytes"], 1),
            }
            for name, m in measured.items()
        }
        results.append({"case": case, "measured": measured, "ratios": ratios})
        for name, r in ratios.items():
            print(f"  {name}: time {r['time_vs_fused']:.2f}x fused, memory {r['memory_vs_fused']:.2f}x")

    if not args.quick:
        saved = {"device": device_description("cpu"), "repetitions": args.repetitions, "results": results}
        write_section(SECTION_HEADING, section_text(save_results(RESULTS_JSON, saved)), BEFORE_HEADING)


if __name__ == "__main__" and not serve_worker(worker):
    main()
