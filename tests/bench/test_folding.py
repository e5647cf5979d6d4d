"""bnlab.bench.folding: unfused vs folded inference, side by side."""

from __future__ import annotations

import json

import pytest

from bnlab.bench import folding


def test_speed_table_rows():
    rows = folding.speed_table(batch=1, image=32, repeats=1, threads=1)
    assert [r["model"] for r in rows] == ["lenet", "resnet18"]
    assert rows[1]["input"] == (1, 3, 32, 32)
    for r in rows:
        assert min(r["unfused_ms"], r["bnlab_ms"], r["fx_ms"]) > 0
        assert r["bnlab_speedup"] == pytest.approx(r["unfused_ms"] / r["bnlab_ms"])
        assert r["max_abs_diff"] < 1e-3
    assert "resnet18" in folding.format_speed_table(rows)


# ------------------------------------------------------------------ folding in context
# Tiny inputs and compile_backend="eager" (dynamo traces, nothing is compiled to C++), so
# these need no compiler and run in seconds; they check the table's logic, never a speed.

CONTEXT = dict(models=("mobilenet_v3_small",), batches=(1, 2), image=32, repeats=1, threads=1)


@pytest.fixture(scope="module")
def context_rows():
    return folding.context_table(**CONTEXT, compile_backend="eager")


def test_context_table_has_every_variant_for_every_batch(context_rows):
    got = [(r["model"], r["batch"], r["variant"]) for r in context_rows]
    assert got == [("mobilenet_v3_small", b, v) for b in (1, 2) for v in folding.VARIANTS]
    assert {r["input"] for r in context_rows} == {(1, 3, 32, 32), (2, 3, 32, 32)}


def test_context_table_outputs_match_and_speedup_is_the_ratio_of_medians(context_rows):
    for batch in (1, 2):
        rows = {r["variant"]: r for r in context_rows if r["batch"] == batch}
        unfused = rows["unfused"]["median_ms"]
        for variant, r in rows.items():
            assert r["error"] is None
            assert r["max_rel_diff"] <= folding.TOLERANCE and r["max_abs_diff"] >= 0
            assert r["median_ms"] > 0 and r["iqr_ms"] >= 0
            assert r["speedup"] == pytest.approx(unfused / r["median_ms"])
            assert (r["compile_s"] is not None) == (variant in folding.COMPILED)
        assert rows["unfused"]["speedup"] == 1 and rows["unfused"]["max_abs_diff"] == 0
        assert all(rows[v]["compile_s"] > 0 for v in folding.COMPILED)


def test_format_context_table_shows_every_row(context_rows):
    text = folding.format_context_table(context_rows)
    assert len(text.splitlines()) == 2 + len(context_rows)
    assert "fold + compile" in text and "fuse_modules" in text and "(2, 3, 32, 32)" in text


def test_a_failed_compile_leaves_its_rows_without_numbers_and_the_table_standing():
    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler found\nsecond line of the message")

    kwargs = {**CONTEXT, "batches": (1,), "repeats": {1: 1}}  # repeats per batch, too
    rows = folding.context_table(**kwargs, compile_backend=no_compiler)
    by = {r["variant"]: r for r in rows}
    for variant in folding.COMPILED:
        r = by[variant]
        assert r["error"] == "RuntimeError: no C++ compiler found"
        assert r["compile_s"] is r["median_ms"] is r["speedup"] is r["max_abs_diff"] is None
    assert all(by[v]["error"] is None and by[v]["speedup"] > 0 for v in folding.VARIANTS[:4])
    assert "not measured: RuntimeError: no C++ compiler found" in folding.format_context_table(rows)


def test_record_context_figures_one_key_per_model_and_batch(context_rows, monkeypatch):
    from bnlab.teaching import results

    recorded = {}
    monkeypatch.setattr(
        results, "record", lambda key, value, what, text: recorded.update({key: (value, text)})
    )
    folding.record_context_figures(context_rows)
    assert set(recorded) == {"bench.fold.mobilenet_v3_small.b1", "bench.fold.mobilenet_v3_small.b2"}
    value, text = recorded["bench.fold.mobilenet_v3_small.b2"]
    assert set(value["speedup"]) == set(folding.VARIANTS) and value["error"] == {}
    assert value["compile_s"]["unfused"] is None and value["compile_s"]["compile"] > 0
    assert "\n" not in text and "fold + compile" in text
    # what the notebook reads back from the store (JSON: tuples become lists)
    figures = {k: {"value": json.loads(json.dumps(v)), "recorded": "2026-01-01"}
               for k, (v, _) in recorded.items()}  # fmt: skip
    figures["bench.fold.lenet"] = {"value": [1.1, 1.2], "recorded": "2025-01-01"}  # speed_table's
    stored = folding.stored_context_rows(figures)
    assert [(r["batch"], r["variant"]) for r in stored] == [
        (r["batch"], r["variant"]) for r in context_rows
    ]
    for r, s in zip(context_rows, stored, strict=True):
        assert {k: s[k] for k in r} == r
        assert s["recorded"] == "2026-01-01" and s["torch"] and s["machine"]
    assert folding.stored_context_rows({}) == []


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_fuse_modules_groups_fuse_every_bn_that_follows_a_conv(name):
    import torch
    import torchvision
    from torch.ao.quantization import fuse_modules

    from bnlab.inference.fusion import max_difference, randomize_bn_
    from bnlab.nn.hooks import batchnorm_layers

    torch.manual_seed(0)
    model = randomize_bn_(getattr(torchvision.models, name)(weights=None)).eval()
    groups = folding.fuse_modules_groups(model)
    fused = fuse_modules(model, groups)
    assert batchnorm_layers(fused) == []
    assert len(groups) == len(batchnorm_layers(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_difference(model(x), fused(x))[1] < folding.TOLERANCE
    relus = [g[2] for g in groups if len(g) == 3]
    if name == "resnet18":  # each BasicBlock calls its one `relu` twice: never fused away
        assert relus == ["relu"]
    else:  # the ReLUs of Conv2dNormActivation blocks; their Hardswishes stay unfused
        assert relus and all(type(model.get_submodule(r)) is torch.nn.ReLU for r in relus)
