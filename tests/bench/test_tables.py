"""bnlab.bench.tables, make bench's driver: both sides get the same threads."""

from __future__ import annotations

import numba
import pytest
import torch

from bnlab.bench import tables


def test_set_threads_gives_torch_and_numba_the_same_count():
    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        for n in (2, 1):
            tables.set_threads(n)
            assert (torch.get_num_threads(), numba.get_num_threads()) == (n, n)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def _bench_run(monkeypatch, store, fail: bool) -> None:
    """record_figures with each section's recorder replaced by one figure (or a failure)."""
    from bnlab.bench import cpu, folding, memory
    from bnlab.teaching import results

    def one(key):
        return lambda *_: results.record(f"bench.{key}", 1, key, table="bench")

    def broken(*_):
        raise RuntimeError("a section failed")

    monkeypatch.setattr(cpu, "record_cpu", one("cpu"))
    monkeypatch.setattr(memory, "record_memory", broken if fail else one("memory"))
    monkeypatch.setattr(folding, "record_context_figures", one("folding"))
    tables.record_figures([([], {"allocator": "default"})], [], [], path=store)


def test_make_bench_commits_its_figures_as_one_set_and_a_failure_changes_nothing(
    tmp_path, monkeypatch
):
    from bnlab.teaching import results

    store = tmp_path / "results.json"
    old = {"table": "bench", "what": "old", "text": "1", "value": 1, "source": "bench",
           "recorded": "2025-01-01"}  # fmt: skip
    results.save({"schema": results.SCHEMA, "figures": {"bench.old": old}}, store)
    before = store.read_bytes()
    monkeypatch.setenv(results.RECORD_ENV, "1")
    monkeypatch.setenv("BNLAB_FAST", "0")
    with pytest.raises(RuntimeError, match="a section failed"):
        _bench_run(monkeypatch, store, fail=True)
    assert store.read_bytes() == before  # the old set, whole: nothing dropped, nothing added
    _bench_run(monkeypatch, store, fail=False)
    figures = results.load(store)["figures"]
    assert "bench.old" not in figures  # a full run replaces the whole set
    assert {"bench.cpu", "bench.memory", "bench.folding", "bench.gpu"} <= set(figures)


def test_a_kernels_only_run_replaces_the_kernel_figures_and_keeps_the_others(tmp_path, monkeypatch):
    from bnlab.bench import cpu
    from bnlab.teaching import results

    store = tmp_path / "results.json"
    old = {"table": "bench", "what": "old", "text": "1", "value": 1, "source": "bench",
           "recorded": "2025-01-01"}  # fmt: skip
    figures = {k: dict(old) for k in ("bench.cpu.warm.old", "bench.memory.a", "bench.fold.b")}
    results.save({"schema": results.SCHEMA, "figures": figures}, store)
    monkeypatch.setenv(results.RECORD_ENV, "1")
    monkeypatch.setenv("BNLAB_FAST", "0")
    monkeypatch.setattr(cpu, "record_cpu", lambda cases, facts: results.record(
        "bench.cpu.warm.new", 2, "new", table="bench"))  # fmt: skip
    tables.record_figures([([], {"allocator": "warm"})], [], [], path=store, sections=("kernels",))
    kept = results.load(store)["figures"]
    assert set(kept) == {"bench.cpu.warm.new", "bench.memory.a", "bench.fold.b"}
    assert kept["bench.cpu.warm.new"]["source"] == "bench"


def test_only_names_a_section():
    with pytest.raises(SystemExit):
        tables.main(["--only", "gpu"])
