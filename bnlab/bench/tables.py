"""``python -m bnlab.bench`` (``make bench``): BatchNorm speed and memory, side by side.

- the CPU kernel cases (:mod:`bnlab.bench.cpu`): torch, bnlab's kernel and
  torch.compile(F.batch_norm), every mode, median and IQR, ratios to torch, each case
  against its read/write floor, the goals judged with what bounds each miss, once with
  the default allocator and once with freed memory kept mapped ("warm");
- peak memory per implementation, each in a fresh process (:mod:`bnlab.bench.memory`);
- BN folding in context (:mod:`bnlab.bench.folding`);
- the GPU has its own script, ``make bench-gpu`` (:mod:`bnlab.bench.gpu`).

``--json PATH`` (``make bench BENCH_JSON=path``) writes every case; a full run puts the
headline figures in the results store, from which the README's tables are generated.
``--only kernels`` (``make bench BENCH_ARGS="--only kernels"``) runs the kernel cases
alone, both allocators, and replaces only their figures in the store.

Serves notebooks 04 and 07 (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bnlab.bench import cpu
from bnlab.teaching.timings import cpu_model

MEMORY_SHAPES = [(32, 64, 56, 56), (1024, 512)]
MEMORY_IMPLS = ("torch", "bnlab kernel", "bnlab scratch")


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch and in numba, so both sides get the same cores."""
    import numba

    torch.set_num_threads(n)
    numba.set_num_threads(n)


def print_cpu_section(cases: list[dict], facts: dict) -> None:
    print(f"\nCPU, float32, {facts['allocator']} allocator: {cpu.machine_text(facts)}")
    print(
        "x torch: torch's median / this median (>1 is faster). floor: the minimum traffic "
        "(channel-blocked for contiguous NCHW: fwd 1 read + 1 write, fwd+bwd 3 + 2; otherwise "
        "fwd 2 + 1, fwd+bwd 6 + 2; eval 1 + 1) at the read and write bandwidths measured on "
        f"buffers of the tensor's size (DRAM's at {cpu.CACHE_FACTOR}x the last-level cache); "
        "of floor: floor / median. torch.compile: compiled before timing, compile s apart\n"
    )
    print(cpu.format_cases(cases))
    compiled = [c for c in cases if c.get("compile_s") is not None]
    if compiled:
        print("\ntorch.compile(F.batch_norm), first call (the compile), not in the medians:")
        for c in compiled:
            print(f"  {tuple(c['shape'])} {c['mode']}: {c['compile_s']:.1f} s")
    print("\nThe kernel's goals, in the medians:")
    print(cpu.format_goals(cpu.goals(cases, facts)))


def warm_allocator_run(quick: bool, threads: int) -> tuple[list[dict], dict]:
    """The CPU cases again in a child process whose allocator keeps freed memory mapped."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "warm.json"
        cmd = [sys.executable, "-m", "bnlab.bench", "--cpu-only", "--threads", str(threads)]
        cmd += ["--json", str(out)] + (["--quick"] if quick else [])
        env = {**os.environ, **cpu.WARM_ALLOCATOR_ENV, "BNLAB_RECORD": "0"}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    return data["cases"], data["machines"][0]


def memory_section(quick: bool, threads: int) -> list[dict]:
    from bnlab.bench.memory import format_memory_table, memory_table

    shapes = MEMORY_SHAPES[:1] if quick else MEMORY_SHAPES
    rows = memory_table(shapes, MEMORY_IMPLS, threads=threads)
    print("\nPeak memory beyond the inputs during one fwd+bwd, each in a fresh process:\n")
    print(format_memory_table(rows))
    return rows


def fusion_section(quick: bool = False, threads: int | None = None) -> list[dict]:
    """Print and return BN folding in context: eager, folded, torch's fusers, torch.compile
    with and without folding (bnlab.bench.folding.context_table)."""
    from bnlab.bench.folding import context_table, format_context_table

    threads = threads or 2
    if quick:
        rows = context_table(
            models=("resnet18",), batches=(1,), image=64, repeats=3, threads=threads
        )
    else:
        rows = context_table(threads=threads)
    print(
        f"\nBN folding in context, CPU inference, {threads} threads: eager, folded, torch's "
        "fusers, torch.compile (inductor) with and without folding first"
    )
    print(
        "speedup: unfused eager median / this median (>1 is faster); compile s: wall time of "
        "the first call, which compiles (not part of the medians)\n"
    )
    print(format_context_table(rows))
    return rows


SECTIONS = ("kernels", "memory", "folding")
# the store keys each section records: a run of some sections replaces only theirs
SECTION_KEYS = {"kernels": "bench.cpu.", "memory": "bench.memory.", "folding": "bench.fold."}


def record_figures(
    machines: list[tuple[list[dict], dict]],
    memory: list[dict],
    fusion_rows: list[dict],
    path: Path | None = None,
    sections: tuple[str, ...] = SECTIONS,
) -> None:
    """Put ``make bench``'s headline figures in the results store (bnlab.teaching.results).

    A run of every section replaces the whole "bench" set at once, when every figure is
    recorded (no figure outlives its case); a run of some ``sections`` (``--only``)
    replaces only their figures (:data:`SECTION_KEYS`) and keeps the others. An error on
    the way leaves the store as it was. path: the store (default: the course's).
    """
    from bnlab.teaching import results

    store = path or results.STORE
    if set(sections) == set(SECTIONS):
        with results.recorded_together("bench", store):
            _record_each(machines, memory, fusion_rows, sections)
        return
    if not results.recording():
        _record_each(machines, memory, fusion_rows, sections)  # shows the lines only
        return
    fd, name = tempfile.mkstemp(prefix="bnlab-results-", suffix=".jsonl")
    os.close(fd)
    previous = os.environ.get(results.PENDING_ENV)
    os.environ[results.PENDING_ENV] = name
    try:
        _record_each(machines, memory, fusion_rows, sections)
        figures = results.read_pending(Path(name))
    finally:
        Path(name).unlink(missing_ok=True)
        if previous is None:
            os.environ.pop(results.PENDING_ENV, None)
        else:
            os.environ[results.PENDING_ENV] = previous
    prefixes = tuple(SECTION_KEYS[s] for s in sections)
    with results.updating(store) as data:
        stale = [k for k in data["figures"] if k.startswith(prefixes) and k not in figures]
        for key in stale:
            del data["figures"][key]
        data["figures"].update(figures)


def _record_each(
    machines: list[tuple[list[dict], dict]],
    memory: list[dict],
    fusion_rows: list[dict],
    sections: tuple[str, ...] = SECTIONS,
) -> None:
    from bnlab.bench.folding import record_context_figures
    from bnlab.bench.memory import record_memory
    from bnlab.teaching.results import record

    if "kernels" in sections:
        for cases, facts in machines:
            cpu.record_cpu(cases, facts)  # with the goals judged on them
    if "memory" in sections:
        record_memory(memory)
    if "folding" in sections:
        record_context_figures(fusion_rows)
    if set(sections) == set(SECTIONS):
        text = (
            "not measured yet: no CUDA GPU on the machines that ran the benchmarks (make bench-gpu)"
        )
        record("bench.gpu", text, "CUDA kernels vs torch on a GPU, make bench-gpu", text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bnlab.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and numba)")
    parser.add_argument("--json", type=Path, default=None, help="write every case here")
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this section (repeatable); the store keeps the other sections' figures",
    )
    parser.add_argument(
        "--cpu-only", action="store_true", help="only the kernel cases, this allocator only"
    )
    args = parser.parse_args(argv)
    sections = (
        ("kernels",)
        if args.cpu_only
        else tuple(s for s in SECTIONS if s in (args.only or SECTIONS))
    )
    set_threads(args.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    import numba

    print(f"torch {torch.__version__}, numba {numba.__version__}, {cpu_model()}, {threads} threads")
    machines, memory, fusion_rows = [], [], []
    if "kernels" in sections:
        cases, facts = cpu.cpu_cases(args.quick)
        print_cpu_section(cases, facts)
        machines.append((cases, facts))
        if not args.cpu_only:
            warm = warm_allocator_run(args.quick, threads)
            print_cpu_section(*warm)
            machines.append(warm)
    if "memory" in sections:
        memory = memory_section(args.quick, threads)
    if "folding" in sections:
        fusion_rows = fusion_section(args.quick, threads)
    if sections == SECTIONS:
        print("\nGPU: not part of make bench; on a CUDA machine run make bench-gpu.")
    if args.json:
        report = {
            "schema": 1,
            "kind": "bench",
            "torch": torch.__version__,
            "numba": numba.__version__,
            "cpu": cpu_model(),
            "threads": threads,
            "machines": [m[1] for m in machines],
            "cases": [c | {"allocator": m[1]["allocator"]} for m in machines for c in m[0]],
            "sections": list(sections),
            "goals": {m[1]["allocator"]: cpu.goals(*m) for m in machines},
            "memory": memory,
            "folding": fusion_rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    if not args.quick and not args.cpu_only:  # the store holds full runs only
        print()
        record_figures(machines, memory, fusion_rows, sections=sections)


if __name__ == "__main__":
    main()
