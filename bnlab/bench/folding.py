"""How much folding BN saves at inference: unfused vs bnlab-folded vs ``torch.fx`` fuse.

Used by ``make bench`` and notebook 07; the folding itself is :mod:`bnlab.inference.fusion`.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from bnlab.bench.timing import time_interleaved
from bnlab.inference.fusion import fold_model, max_difference, randomize_bn_


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
