"""How much folding BN saves at inference, alone and next to what a compiler does.

- :func:`speed_table`: unfused vs bnlab-folded vs ``torch.fx`` fuse (notebook 07, section 5);
- :func:`context_table`: ResNet-18 and MobileNetV3-small, eager and ``torch.compile``d, with
  and without folding, against torch's two fusers (``make bench``, notebook 07, section 6).

The folding itself is :mod:`bnlab.inference.fusion`.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bnlab.bench.timing import measure_interleaved, time_interleaved
from bnlab.inference.fusion import (
    fold_model,
    foldable_pairs,
    max_difference,
    randomize_bn_,
    trace,
)


def _bench_models(names: tuple[str, ...]) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    from bnlab.experiments.models import lenet

    out = {}
    for name in names:
        if name == "lenet":
            out[name] = (lenet(bn="torch", activation="relu"), (1, 28, 28))
        elif name == "resnet18":
            import torchvision

            out[name] = (torchvision.models.resnet18(weights=None), (3, 224, 224))
        else:
            raise ValueError(f"models must name 'lenet' or 'resnet18' (got {name!r})")
    return out


def speed_table(
    models: tuple[str, ...] = ("lenet", "resnet18"),
    batch: int = 10,
    image: int | None = None,
    repeats: int = 20,
    threads: int | None = 2,
    seed: int = 0,
) -> list[dict]:
    """Median CPU inference time: unfused vs bnlab-folded vs ``torch.fx`` fuse, side by side.

    Inputs:
    - models: "lenet" (LeNet-BN, ReLU, (batch, 1, 28, 28)) and/or "resnet18"
      (torchvision, random init, (batch, 3, image, image), image=224 by default).
    - batch, image: input size (image only applies to ResNet-18).
    - repeats: timed calls per variant, interleaved; threads: torch.set_num_threads for
      the run (restored afterwards), None to leave it.

    Returns one dict per model: model, input, unfused_ms, bnlab_ms, fx_ms (medians),
    bnlab_speedup, fx_speedup (unfused / folded), max_abs_diff (bnlab vs unfused).
    """
    from torch.fx.experimental.optimization import fuse as fx_fuse

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        for name, (model, shape) in _bench_models(tuple(models)).items():
            torch.manual_seed(seed)
            randomize_bn_(model, seed).eval()
            if name == "resnet18" and image is not None:
                shape = (3, image, image)
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
            variants = {"unfused": model, "bnlab": fold_model(model), "fx": fx_fuse(model)}
            with torch.inference_mode():
                ref = model(x)
                diff = max_difference(ref, variants["bnlab"](x))[0]
                fns = {k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}
                times = time_interleaved(fns, repeats=repeats)
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            rows.append(
                dict(
                    model=name,
                    input=(batch, *shape),
                    unfused_ms=ms["unfused"],
                    bnlab_ms=ms["bnlab"],
                    fx_ms=ms["fx"],
                    bnlab_speedup=ms["unfused"] / ms["bnlab"],
                    fx_speedup=ms["unfused"] / ms["fx"],
                    max_abs_diff=diff,
                )
            )
    finally:
        torch.set_num_threads(old_threads)
    return rows


def format_speed_table(rows: list[dict]) -> str:
    """The rows of :func:`speed_table` as a fixed-width text table."""
    head = f"{'model':<10}{'input':<20}{'unfused ms':>11}{'bnlab ms':>10}{'fx ms':>9}"
    head += f"{'bnlab x':>9}{'fx x':>7}{'max|diff|':>11}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['model']:<10}{str(r['input']):<20}{r['unfused_ms']:>11.2f}{r['bnlab_ms']:>10.2f}"
            f"{r['fx_ms']:>9.2f}{r['bnlab_speedup']:>9.2f}{r['fx_speedup']:>7.2f}"
            f"{r['max_abs_diff']:>11.1e}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- in context

VARIANTS = ("unfused", "bnlab fold", "fx fuse", "fuse_modules", "compile", "fold + compile")
COMPILED = ("compile", "fold + compile")
TOLERANCE = 1e-4  # max |variant - unfused| / max |unfused| that still counts as the same output
REPEATS = {1: 7, 32: 4}  # interleaved rounds per batch: a batch-32 round costs ~20x a batch-1 one


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    builders = {
        "resnet18": torchvision.models.resnet18,
        "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
    }
    if name not in builders:
        raise ValueError(f"models must name {' or '.join(map(repr, builders))} (got {name!r})")
    return builders[name](weights=None)


def _fuses(*kinds: type[nn.Module]) -> bool:
    """Whether torch.ao.quantization.fuse_modules knows how to fuse this sequence of types."""
    from torch.ao.quantization.fuser_method_mappings import get_fuser_method

    try:  # it raises AssertionError("did not find fuser method for: ...") when it does not
        return get_fuser_method(kinds) is not None
    except AssertionError:
        return False


def fuse_modules_groups(model: nn.Module) -> list[list[str]]:
    """The module names to hand to ``torch.ao.quantization.fuse_modules``: [conv, bn(, relu)].

    ``fuse_modules`` fuses only what it is told, by name, and only the type sequences it
    knows: conv + BN and conv + BN + ReLU (a Hardswish, as in MobileNetV3's
    ``Conv2dNormActivation``, is not one of them, so such a group stops at the BN). The
    names cannot be read off ``named_modules()`` order alone: that is registration order,
    not call order, and it does not show reuse. torchvision's ResNet ``BasicBlock`` calls
    one ``relu`` module twice, after ``bn1`` and after the residual add; fusing it into
    ``[conv1, bn1, relu]`` would turn it into Identity and silently drop the second ReLU.
    So the groups come from the model's ``torch.fx`` trace (:func:`bnlab.inference.fusion.
    trace`), which shows who feeds whom: every conv -> BN pair that folding may fuse
    (:func:`~bnlab.inference.fusion.foldable_pairs`), plus the ReLU module that reads the
    BN's output when nothing else does and the ReLU is called at that one place only.

    Input: a model in eval mode that ``torch.fx`` can trace.
    Returns the groups in graph order, e.g. ``[["conv1", "bn1", "relu"], ["layer1.0.conv1",
    "layer1.0.bn1"], ...]`` for ResNet-18.
    """
    gm = trace(model)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    groups = []
    for layer_node, bn_node in foldable_pairs(gm):
        kinds = [type(gm.get_submodule(n.target)) for n in (layer_node, bn_node)]
        if not _fuses(*kinds):
            continue
        group = [layer_node.target, bn_node.target]
        (user, *others) = list(bn_node.users)
        if not others and user.op == "call_module" and calls[user.target] == 1:
            relu = type(gm.get_submodule(user.target))
            if relu is nn.ReLU and _fuses(*kinds, relu):
                group.append(user.target)
        groups.append(group)
    return groups


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of the error a compiler backend raised, at most
    200 characters (dynamo wraps it: ``BackendCompilerFailed.inner_exception``)."""
    while getattr(err, "inner_exception", None) is not None:
        err = err.inner_exception
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:200]


@contextmanager
def _cold_cache(backend, root: str) -> Iterator[None]:
    """A new, empty inductor cache directory under ``root`` for the block (inductor only).

    Each compile gets its own, so that its time is a cold compile: not a hit in an earlier
    run's on-disk cache, nor in the kernels the other compiled variant just built (the two
    graphs share many kernels). The directories stay until ``root`` is removed, so nothing
    the compiled code loads disappears under it.
    """
    if backend != "inductor":
        yield
        return
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # torch < 2.8
    with fresh(dir=root, delete=False):
        yield


def _warm_up(backend, root: str) -> None:
    """Compile a tiny conv-BN-ReLU once, so that the first compile time reported does not
    include the compiler's one-time start-up (imports, precompiled headers). Its errors are
    ignored here: the variants that need the compiler report them."""
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    try:
        with _cold_cache(backend, root), torch.inference_mode():
            torch.compile(tiny, backend=backend, dynamic=False)(torch.randn(1, 3, 8, 8))
    except Exception:
        pass
    torch._dynamo.reset()


def _variants(model: nn.Module, backend) -> dict[str, nn.Module]:
    """The six ways to run ``model`` (eval mode, random BN statistics), not yet called."""
    from torch.ao.quantization import fuse_modules
    from torch.fx.experimental.optimization import fuse as fx_fuse

    folded = fold_model(model)
    return {
        "unfused": model,
        "bnlab fold": folded,
        "fx fuse": fx_fuse(model),
        "fuse_modules": fuse_modules(model, fuse_modules_groups(model)),
        "compile": torch.compile(model, backend=backend, dynamic=False),
        "fold + compile": torch.compile(folded, backend=backend, dynamic=False),
    }


def _context_rows(
    name: str, model: nn.Module, x: Tensor, repeats: int, threads: int, backend, root: str
) -> list[dict]:
    """The rows of one (model, batch): compile first (timed), then all variants interleaved."""
    torch._dynamo.reset()  # nothing compiled for an earlier model or shape is reused
    variants = _variants(model, backend)
    errors: dict[str, str] = {}
    compile_s: dict[str, float] = {}
    with torch.inference_mode():
        ref = model(x)
        outs = {}
        for variant, m in variants.items():
            start = time.perf_counter()
            try:
                with _cold_cache(backend if variant in COMPILED else None, root):
                    outs[variant] = m(x)  # a compiled variant compiles here
            except Exception as err:  # a missing C++ compiler, an unsupported op, ...
                if variant not in COMPILED:
                    raise
                errors[variant] = _one_line(err)
                continue
            if variant in COMPILED:
                compile_s[variant] = time.perf_counter() - start
        diffs = {v: max_difference(ref, out) for v, out in outs.items()}
        for variant, (_, rel) in diffs.items():
            if not rel <= TOLERANCE:
                raise RuntimeError(
                    f"{name} {tuple(x.shape)}: '{variant}' differs from the unfused model by "
                    f"{rel:.1e} of the output's scale (more than {TOLERANCE:.0e}): not timed, "
                    "since a wrong model's speed means nothing"
                )
        fns = {v: (lambda m=m: m(x)) for v, m in variants.items() if v not in errors}
        times = measure_interleaved(fns, repeats=repeats, threads=threads)
    base = times["unfused"].median
    rows = []
    for variant in variants:
        t = times.get(variant)
        rows.append(
            dict(
                model=name,
                batch=x.shape[0],
                threads=threads,
                input=tuple(x.shape),
                variant=variant,
                median_ms=None if t is None else 1e3 * t.median,
                iqr_ms=None if t is None else 1e3 * t.iqr,
                speedup=None if t is None else base / t.median,
                compile_s=compile_s.get(variant),
                max_abs_diff=diffs[variant][0] if variant in diffs else None,
                max_rel_diff=diffs[variant][1] if variant in diffs else None,
                error=errors.get(variant),
            )
        )
    return rows


def context_table(
    models: tuple[str, ...] = ("resnet18", "mobilenet_v3_small"),
    batches: tuple[int, ...] = (1, 32),
    image: int = 224,
    repeats: int | Mapping[int, int] = REPEATS,
    threads: int | None = 2,
    compile_backend: str | Callable = "inductor",
    seed: int = 0,
) -> list[dict]:
    """Folding among its alternatives: median CPU inference time of six variants, one run.

    For each torchvision model (``weights=None``, every BN given random statistics by
    :func:`~bnlab.inference.fusion.randomize_bn_`, eval mode, ``torch.inference_mode``) and
    each batch, on input (batch, 3, image, image):

    - "unfused": the eager model; "bnlab fold": :func:`~bnlab.inference.fusion.fold_model`;
      "fx fuse": ``torch.fx.experimental.optimization.fuse``; "fuse_modules":
      ``torch.ao.quantization.fuse_modules`` on :func:`fuse_modules_groups`;
    - "compile": ``torch.compile(model, backend=compile_backend, dynamic=False)`` of the
      unfused model; "fold + compile": the same of the bnlab-folded model.

    The compiled variants compile on their first call, which is timed on its own (wall
    time of a cold compile: a fresh inductor cache for each, ``torch._dynamo.reset()``
    before each model and batch, the compiler's start-up paid beforehand on a tiny model)
    and never enters the medians. Then all six run interleaved in one
    :func:`~bnlab.bench.timing.measure_interleaved` call. Every output is compared with the
    unfused one first; a variant off by more than ``TOLERANCE`` of the output's scale
    raises RuntimeError (a wrong model is not timed). A compile that fails (no C++
    compiler, say) does not stop the table: its row has ``error`` and no numbers.

    Inputs:
    - models: "resnet18" and/or "mobilenet_v3_small"; batches; image: side in pixels.
    - repeats: interleaved rounds per (model, batch), or {batch: rounds} (a batch it does
      not name gets its smallest count); the default :data:`REPEATS` keeps a full run on
      two cores to about six minutes.
    - threads: torch.set_num_threads for the run (restored afterwards), None to leave it.
    - compile_backend: torch.compile's backend ("inductor"; "eager" only captures the
      graph and compiles nothing: the tests use it, no C++ compiler needed).

    Returns one dict per (model, batch, variant), in that order: model, batch, threads,
    input (shape), variant, median_ms, iqr_ms, speedup (unfused median / this median),
    compile_s (None for eager variants), max_abs_diff and max_rel_diff (vs unfused), error
    (None, or the one-line reason a compiled variant has no numbers).
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bnlab-compile-") as root:
            _warm_up(compile_backend, root)
            for name in models:
                torch.manual_seed(seed)
                model = randomize_bn_(_torchvision_model(name), seed).eval()
                for batch in batches:
                    gen = torch.Generator().manual_seed(seed)
                    x = torch.randn(batch, 3, image, image, generator=gen)
                    if isinstance(repeats, int):
                        rounds = repeats
                    else:
                        rounds = repeats.get(batch, min(repeats.values()))
                    threads_now = torch.get_num_threads()
                    rows += _context_rows(
                        name, model, x, rounds, threads_now, compile_backend, root
                    )
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(old_threads)
    return rows


def format_context_table(rows: list[dict]) -> str:
    """The rows of :func:`context_table` as a fixed-width text table (times in ms)."""
    head = (
        f"{'model':<19}{'input':<18}{'variant':<16}{'median ms':>10}{'IQR ms':>8}"
        f"{'speedup':>8}{'compile s':>10}{'max|diff|':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        start = f"{r['model']:<19}{str(r['input']):<18}{r['variant']:<16}"
        if r["error"] is not None:
            lines.append(f"{start}not measured: {r['error']}")
            continue
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(
            f"{start}{r['median_ms']:>10.2f}{r['iqr_ms']:>8.2f}{r['speedup']:>7.2f}x"
            f"{compile_s:>10}{r['max_abs_diff']:>10.1e}"
        )
    return "\n".join(lines)


ROW_FIELDS = ("median_ms", "iqr_ms", "speedup", "compile_s", "max_abs_diff", "max_rel_diff")
STORED_KEY = re.compile(r"bench\.fold\.(\w+)\.b(\d+)")


def record_context_figures(rows: list[dict]) -> None:
    """Put :func:`context_table`'s figures in the results store, one key per (model, batch).

    Key ``bench.fold.<model>.b<batch>``; value {"speedup", "median_ms", "iqr_ms",
    "compile_s", "max_abs_diff", "max_rel_diff": {variant: number or None}, "error":
    {variant: reason} of the compiles that failed, "input", "threads", "torch", "machine"}
    (:func:`stored_context_rows` reads it back); the text lists the speedups and compile
    times. Records only in a full ``make bench`` run (see :func:`bnlab.teaching.results.record`).
    """
    from bnlab.teaching.results import record
    from bnlab.teaching.timings import machine

    for (model, batch), group in _by_model_batch(rows).items():
        by = {r["variant"]: r for r in group}
        value = {field: {v: r[field] for v, r in by.items()} for field in ROW_FIELDS}
        value["error"] = {v: r["error"] for v, r in by.items() if r["error"]}
        value.update(
            input=list(group[0]["input"]),
            threads=group[0]["threads"],
            torch=torch.__version__,
            machine=machine(),
        )
        speedups = ", ".join(
            f"{v} {r['speedup']:.2f}x" if r["error"] is None else f"{v} not measured"
            for v, r in by.items()
            if v != "unfused"
        )
        compiled = [f"{v} {by[v]['compile_s']:.0f} s" for v in COMPILED if by[v]["compile_s"]]
        text = speedups + (f"; compile time: {', '.join(compiled)}" if compiled else "")
        record(
            f"bench.fold.{model}.b{batch}",
            value,
            f"inference speedup over unfused eager, {model} {group[0]['input']}, CPU "
            f"{value['threads']} threads: folding vs torch.compile, make bench",
            text,
        )


def stored_context_rows(figures: dict[str, dict]) -> list[dict]:
    """The rows that :func:`record_context_figures` stored, back in :func:`context_table`'s form.

    Input: the results store's figures (``bnlab.teaching.results.load()["figures"]``).
    Returns its rows in (model, batch) order, each with the stored "threads", "torch", "machine" and
    "recorded" (date) added; an empty list when ``make bench`` has not recorded them yet.
    """
    found = []
    for key, figure in figures.items():
        match = STORED_KEY.fullmatch(key)
        value = figure["value"]
        if match and isinstance(value, dict) and "speedup" in value:  # not speed_table's
            found.append(((match[1], int(match[2])), figure))
    rows = []
    for (model, batch), figure in sorted(found, key=lambda item: item[0]):
        value = figure["value"]
        # the store writes its keys sorted: the table's own order comes from VARIANTS
        for variant in (v for v in VARIANTS if v in value["speedup"]):
            rows.append(
                dict(
                    model=model,
                    batch=batch,
                    input=tuple(value["input"]),
                    variant=variant,
                    **{field: value[field][variant] for field in ROW_FIELDS},
                    error=value["error"].get(variant),
                    threads=value["threads"],
                    torch=value["torch"],
                    machine=value["machine"],
                    recorded=figure["recorded"],
                )
            )
    return rows


def _by_model_batch(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"]), []).append(r)
    return groups
