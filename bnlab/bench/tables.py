"""``python -m bnlab.bench``: Batch Normalization speed, measured side by side in one run.

Each section is a function returning rows (dicts); :func:`main` prints them as tables.
Effective bandwidth counts full-tensor passes as PyTorch's own normalization benchmark
does: 3 for a training forward (read x for the statistics, read x, write y) and 7 for
forward + backward. It is compared with this machine's copy bandwidth, measured on a
tensor larger than the caches (a copy reads and writes: 2 passes).

Serves notebook 04 (`make bench`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as TF

from bnlab.bench.timing import median_times
from bnlab.nn import functional as F

CPU_SHAPES = [(32, 64, 56, 56), (256, 64, 28, 28), (1024, 512)]
GPU_SHAPES = [(32, 64, 56, 56), (256, 64, 28, 28), (1024, 512), (64, 256, 56, 56)]
PASSES = {"fwd": 3, "fwd+bwd": 7}


def copy_bandwidth(nbytes: int = 512 * 2**20, repeat: int = 5, device: str = "cpu") -> float:
    """Measured copy bandwidth in GB/s (bytes read + written per second) of a large tensor."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = median_times({"copy": lambda: dst.copy_(src)}, repeat, sync)["copy"]
    return 2 * nbytes / seconds / 1e9


def implementations(device: str) -> dict[str, Callable]:
    """The batch_norm functions compared: name -> f(x, rm, rv, w, b, training)."""
    from bnlab.kernels.autograd import batch_norm as kernel_bn  # numba: only when measured

    backend = "cpu" if device == "cpu" else "cuda"
    return {
        "torch native": TF.batch_norm,
        "bnlab scratch": F.batch_norm,
        f"bnlab {backend} kernel": lambda *a: kernel_bn(*a, backend=backend),
    }


def measure(shape, device: str, repeat: int) -> list[dict]:
    """Training forward and forward+backward time of every implementation on one shape.

    The implementations run interleaved, so they share the machine's load; the
    gradients are reset before each backward (as ``zero_grad()`` does), so no call
    pays for accumulating into the previous call's gradient.
    """
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=g)
    c = shape[1]
    w = torch.rand(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    xg, dy = x.clone().requires_grad_(), torch.randn_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    impls = implementations(device)

    def fwd(bn):
        with torch.no_grad():
            return bn(x, rm, rv, w, b, True, 0.1, 1e-5)

    def fwd_bwd(bn):
        xg.grad = w.grad = b.grad = None
        bn(xg, rm, rv, w, b, True, 0.1, 1e-5).backward(dy)

    def timed(step):
        return median_times({n: partial(step, bn) for n, bn in impls.items()}, repeat, sync)

    times = {"fwd": timed(fwd), "fwd+bwd": timed(fwd_bwd)}
    nbytes = x.numel() * x.element_size()
    rows = [
        {"shape": tuple(shape), "impl": n, **{k: t[n] for k, t in times.items()}, "nbytes": nbytes}
        for n in impls
    ]
    torch_row = rows[0]
    for row in rows:
        for key, passes in PASSES.items():
            row[f"{key} vs torch"] = torch_row[key] / row[key]  # > 1: faster than torch
            row[f"{key} GB/s"] = passes * row["nbytes"] / row[key] / 1e9
    return rows


def cpu_section(quick: bool = False) -> tuple[list[dict], float]:
    """Rows for the CPU shapes, and the copy bandwidth they are compared with (GB/s)."""
    repeat = 3 if quick else 7
    shapes = CPU_SHAPES[:1] + CPU_SHAPES[2:] if quick else CPU_SHAPES
    copy = copy_bandwidth(repeat=repeat)
    return [row for s in shapes for row in measure(s, "cpu", repeat)], copy


def gpu_peak_bandwidth() -> float:
    """The GPU's peak memory bandwidth in GB/s: 2 (double data rate) x clock x bus width."""
    from bnlab.kernels.backend import cuda_module

    dev = cuda_module().get_current_device()
    clock_hz = dev.MEMORY_CLOCK_RATE * 1e3  # reported in kHz
    return 2 * clock_hz * dev.GLOBAL_MEMORY_BUS_WIDTH / 8 / 1e9


def torch_gpu_backend(shape) -> str:
    """Which kernel torch's batch_norm dispatches to on this GPU: cuDNN, MIOpen or native."""
    x = torch.empty(shape, device="cuda")
    v = torch.ones(shape[1], device="cuda")
    return str(torch._C._select_batch_norm_backend(x, v, v, v, v, True, 1e-5)).split(".")[-1]


def gpu_section(quick: bool = False) -> tuple[list[dict], dict] | None:
    """GPU rows and device facts, or None without a GPU (nothing is measured, nothing faked)."""
    if not torch.cuda.is_available():
        return None
    repeat = 10 if quick else 50
    rows = [row for s in GPU_SHAPES for row in measure(s, "cuda", repeat)]
    info = {
        "device": torch.cuda.get_device_name(),
        "peak GB/s": gpu_peak_bandwidth(),
        "copy GB/s": copy_bandwidth(2**30, repeat, "cuda"),
        "torch backend": torch_gpu_backend(GPU_SHAPES[-1]),
    }
    return rows, info


def format_table(rows: list[dict], limit: float, limit_name: str) -> str:
    """A text table: times in ms, ratios to torch, GB/s and its share of ``limit``."""
    head = (
        f"{'shape':<18} {'implementation':<18} {'fwd ms':>8} {'x torch':>7} {'GB/s':>6} "
        f"{'fwd+bwd ms':>10} {'x torch':>7} {'GB/s':>6} {'% ' + limit_name:>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{str(r['shape']):<18} {r['impl']:<18} {r['fwd'] * 1e3:>8.2f} "
            f"{r['fwd vs torch']:>7.2f} {r['fwd GB/s']:>6.1f} {r['fwd+bwd'] * 1e3:>10.2f} "
            f"{r['fwd+bwd vs torch']:>7.2f} {r['fwd+bwd GB/s']:>6.1f} "
            f"{100 * r['fwd+bwd GB/s'] / limit:>9.0f}%"
        )
    return "\n".join(lines)


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch and in numba, so both sides get the same cores."""
    import numba

    torch.set_num_threads(n)
    numba.set_num_threads(n)


def fusion_section(quick: bool = False, threads: int | None = None) -> list[dict]:
    """Print and return the BN-folding inference speedups (bnlab.bench.folding.speed_table)."""
    from bnlab.bench.folding import format_speed_table, speed_table

    image = 64 if quick else None
    rows = speed_table(image=image, repeats=5 if quick else 20, threads=threads or 2)
    size = f"{image}x{image}" if quick else "224x224"
    print(f"\nBN folded into the conv before it, CPU inference (ResNet-18 at batch 10, {size})")
    print("x: unfused time / folded time (>1 is faster)\n")
    print(format_speed_table(rows))
    return rows


def record_figures(rows: list[dict], copy: float, fusion_rows: list[dict], gpu) -> None:
    """Put ``make bench``'s headline figures in the results store (bnlab.teaching.results)."""
    from bnlab.teaching.results import record

    kernel = [r for r in rows if r["impl"].endswith("kernel")]
    for r in kernel:
        shape = "x".join(map(str, r["shape"]))
        record(
            f"bench.cpu.{shape}",
            {k: r[k] for k in ("fwd vs torch", "fwd+bwd vs torch", "fwd+bwd GB/s")},
            f"CPU kernel vs torch, training, float32, {tuple(r['shape'])}, "
            f"{torch.get_num_threads()} threads, make bench",
            f"forward {r['fwd vs torch']:.2f}x, forward+backward {r['fwd+bwd vs torch']:.2f}x; "
            f"{r['fwd+bwd GB/s']:.1f} GB/s = {100 * r['fwd+bwd GB/s'] / copy:.0f}% of copy "
            f"bandwidth {copy:.1f} GB/s",
        )
    for r in fusion_rows:
        record(
            f"bench.fold.{r['model']}",
            [r["bnlab_speedup"], r["fx_speedup"]],
            f"inference speedup from folding BN, {r['model']} {r['input']}, CPU "
            "(bnlab / torch.fx fuse), make bench",
            f"{r['bnlab_speedup']:.2f}x / {r['fx_speedup']:.2f}x",
        )
    text = "not measured: no CUDA GPU on the machine that ran make bench"
    if gpu is not None:
        text = "; ".join(
            f"{tuple(r['shape'])} {r['impl']}: fwd+bwd {r['fwd+bwd vs torch']:.2f}x"
            for r in gpu[0]
            if r["impl"].endswith("kernel")
        )
    record("bench.gpu", text, "CUDA kernels vs torch on a GPU, make bench", text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bnlab.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and numba)")
    args = parser.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rows, copy = cpu_section(args.quick)
    print(f"\nCPU, float32, training mode. Copy bandwidth: {copy:.1f} GB/s")
    print("x torch: torch's time / this time (>1 is faster); GB/s: 3 passes fwd, 7 fwd+bwd\n")
    print(format_table(rows, copy, "copy"))
    fusion_rows = fusion_section(args.quick, args.threads)
    gpu = gpu_section(args.quick)
    if gpu is None:
        print("\nGPU: no CUDA GPU on this machine, so no GPU rows were measured.")
    else:
        gpu_rows, info = gpu
        print(
            f"\nGPU {info['device']}: peak {info['peak GB/s']:.0f} GB/s from its attributes, "
            f"copy {info['copy GB/s']:.0f} GB/s; torch's batch_norm backend: "
            f"{info['torch backend']}\n"
        )
        print(format_table(gpu_rows, info["peak GB/s"], "peak"))
    if not args.quick:  # the store holds full runs only
        print()
        record_figures(rows, copy, fusion_rows, gpu)


if __name__ == "__main__":
    main()
