"""The numba.cuda kernels: on the CUDA simulator (tiny shapes) or a GPU, and as PTX.

The simulator is chosen when numba.cuda is first imported, so this file asks for it
through bnlab.kernels.backend before importing the kernels; the PTX check needs the
real target and runs in a subprocess of its own (bnlab.kernels.ptx).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from bnlab.kernels import autograd as A
from bnlab.kernels import backend, stability
from bnlab.nn import functional as F

cuda = backend.cuda_module()  # the simulator here, unless a GPU is present
from bnlab.kernels import cuda as K  # noqa: E402 (after the backend choice)

DEV = "cpu" if K.SIMULATOR else "cuda"
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
# N*HW = 75 and 21 values per channel: not multiples of the 32-thread simulator block
SHAPES = [(3, 2, 5, 5), (7, 3), (3, 1, 7)]


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    c = shape[1]
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return (t.to(dtype=dtype, device=DEV) for t in (x, w, b, dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_torch(shape, dtype):
    x, w, b, dy = _data(shape, dtype)
    mean, var, invstd = K.channel_stats(x)
    ref_mean, ref_var = F.batch_stats(x)
    torch.testing.assert_close(mean, ref_mean, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(var, ref_var, rtol=TOL[dtype], atol=TOL[dtype])
    grads, outs = [], []
    for bn in (torch.nn.functional.batch_norm, A.batch_norm):
        kw = {"backend": "cuda"} if bn is A.batch_norm else {}
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = bn(xs, None, None, ws, bs, True, **kw)
        out.backward(dy)
        outs.append(out.detach())
        grads.append((xs.grad, ws.grad, bs.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=TOL[dtype], atol=TOL[dtype])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=10 * TOL[dtype], atol=10 * TOL[dtype])


def test_channels_last_runs_the_rows_kernels_and_matches_torch():
    x, w, b, dy = _data((2, 3, 2, 2), torch.float32)
    x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    outs, grads = [], []
    for bn, kw in ((torch.nn.functional.batch_norm, {}), (A.batch_norm, {"backend": "cuda"})):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        out = bn(xs, None, None, ws, bs, True, **kw)
        out.backward(dy)
        outs.append(out.detach())
        grads.append((xs.grad, ws.grad, bs.grad))
    assert outs[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-5, atol=2e-5)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


# (17, 2, 5, 5): planes of 25, blocks of (4, 8) threads, so 3 blocks per channel each get
# rows; (40, 3): rows, blocks of (4 channels, 8 rows)
@pytest.mark.parametrize("shape", [(17, 2, 5, 5), (40, 3)])
def test_split_reductions_merge_to_the_one_block_result(shape):
    x, _, _, dy = _data(shape, torch.float64)
    mean, var, invstd = K.channel_stats(x, split=3)
    ref_mean, ref_var = F.batch_stats(x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    sum_dy, sum_dy_xhat = K.backward_reduce(dy, x, mean, invstd, split=3)
    dims = [0, *range(2, x.dim())]
    xhat = (x - ref_mean.view(1, -1, *[1] * (x.dim() - 2))) * invstd.view(
        1, -1, *[1] * (x.dim() - 2)
    )
    torch.testing.assert_close(sum_dy, dy.sum(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum_dy_xhat, (dy * xhat).sum(dims), rtol=1e-12, atol=1e-12)


def test_blocks_of_two_warps_merge_through_the_staging_buffer(monkeypatch):
    # BLOCK 64 on the simulator: the warps' partials go through shared memory, as on a GPU
    monkeypatch.setattr(K, "BLOCK", 64)
    for shape in ((3, 2, 2, 8), (9, 3)):  # planes of 16 (TX 4, TY 16); rows (TX 4, TY 16)
        x, w, b, dy = _data(shape, torch.float64)
        y, mean, invstd = K.forward_train(x, w, b, None, None, 0.1, 1e-5)
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        ref = torch.nn.functional.batch_norm(xs, None, None, ws, bs, True)
        ref.backward(dy)
        torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
        dx, dgamma, dbeta = K.backward_train(dy, x, mean, invstd, w)
        for got, want in ((dx, xs.grad), (dgamma, ws.grad), (dbeta, bs.grad)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_a_constant_channel_normalizes_to_beta_exactly():
    x = torch.full((4, 2, 3, 3), -1e4, device=DEV)
    w, b = torch.tensor([1.0, 2.0], device=DEV), torch.tensor([-0.5, 0.25], device=DEV)
    y, _, _ = K.forward_train(x, w, b, None, None, 0.1, 1e-5)
    torch.testing.assert_close(y[:, 0], torch.full_like(y[:, 0], -0.5), rtol=0, atol=1e-6)
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], 0.25), rtol=0, atol=1e-6)


def test_launch_geometry_takes_the_channel_from_the_grid(monkeypatch):
    monkeypatch.setattr(K, "SIMULATOR", False)
    monkeypatch.setattr(K, "BLOCK", 256)
    assert K.plane_block(56 * 56) == (256, 1)  # a row of 3136 read 4 loads at a time
    assert K.plane_block(7 * 7) == (8, 32)
    assert K.rows_block(256) == (32, 8) and K.rows_block(3) == (4, 64)
    # (64, 256, 56, 56): 4 blocks per channel, 1024 in all; C = 64: 16 per channel
    assert K.reduction_split(64, 3136, 256, 1) == 4
    assert K.reduction_split(32, 3136, 64, 1) == 16
    assert K.reduction_split(8, 4, 256, 1) == 1  # too little work to split
    assert K.elementwise_split(64, 256, 1) == 16


def test_a_training_fwd_bwd_converts_few_arrays():
    x, w, b, dy = _data((3, 2, 5, 5), torch.float32)
    rm, rv = torch.zeros(2, device=DEV), torch.ones(2, device=DEV)
    before = K.CONVERSIONS["count"]
    y, mean, invstd = K.forward_train(x, w, b, rm, rv, 0.1, 1e-5)
    K.backward_train(dy, x, mean, invstd, w)
    # forward: work, running mean and var, x, weight, bias, y; backward: x, dy, mean, invstd,
    # work, weight, dx (31 before the kernels shared their work arrays). On a GPU the arrays
    # of weight, bias and the running buffers are cached: 9 conversions after the first call.
    assert K.CONVERSIONS["count"] - before == 14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_running_stats_match_torch(dtype):
    ref = torch.nn.BatchNorm2d(2, dtype=dtype, device=DEV)
    mine = A.BatchNorm2d(2, dtype=dtype, device=DEV, backend="cuda")
    mine.load_state_dict(ref.state_dict())
    for seed in range(2):
        x, *_ = _data((3, 2, 5, 5), dtype, seed)
        ref(x), mine(x)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    ref.eval(), mine.eval()
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)


def test_welford_chan_is_stable_where_the_naive_formula_fails():
    x, exact = stability.shifted_data((4, 2, 6, 6), mean=1e4, std=1.0)
    for split in (1, 2):
        _, var, _ = K.channel_stats(x.to(DEV), split=split)
        assert stability.relative_error(var.cpu(), exact) < 1e-3
    assert stability.relative_error(stability.naive_variance(x), exact) > 1e-2


def test_bad_inputs_raise_clear_errors():
    x, w, b, dy = _data((3, 2, 5, 5), torch.float32)
    mean, _, invstd = K.channel_stats(x)
    with pytest.raises(ValueError, match="contiguous"):
        K.channel_stats(x.transpose(2, 3))
    with pytest.raises(TypeError, match="float32 and float64"):
        K.channel_stats(x.to(torch.float16))
    with pytest.raises(ValueError, match=r"invstd must have shape \(2,\)"):
        K.normalize(x, mean, invstd[:1], w, b)
    with pytest.raises(ValueError, match="grad_output must match"):
        K.backward_elementwise(dy.double(), x, mean, invstd, w, mean, mean, 75)
    if K.SIMULATOR:  # the simulator works on host memory; any other device is refused
        assert K.available() == "simulator"
        with pytest.raises(ValueError, match=r"input is on meta.*host \(CPU\) tensors"):
            K.channel_stats(x.to("meta"))
    else:
        with pytest.raises(ValueError, match="call .cuda"):
            K.channel_stats(x.cpu())


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def ptx_report():
    proc = _python("from bnlab.kernels import ptx; ptx.main()", NUMBA_ENABLE_CUDASIM="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_to_ptx_for_sm90_without_f64_in_float32(ptx_report):
    kernels = set(K.sources())
    rows = [r for r in ptx_report if not r["control"]]
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for k in kernels for d in ("float32", "float64")
    }
    for r in rows:
        assert r["entry"], r["kernel"]
        if r["dtype"] == "float32":  # the signature that runs: eps and momentum float32
            assert r["f64"] == [] and r["f64_sqrt_div"] == [], (r["kernel"], r["f64"][:3])
        else:  # the detector does see float64 arithmetic when it is there
            assert r["f64"], r["kernel"]
        # no per-element 64-bit division: at most the strided loop's trip count, once
        assert len(r["int64_div"]) <= 1, (r["kernel"], r["int64_div"])
        reduces = r["kernel"].startswith(("channel_stats", "backward_reduce", "merge_"))
        assert (r["shfl"] > 0) == reduces, r["kernel"]  # warp shuffles in every reduction
        assert r["bar"] <= 1, r["kernel"]  # one barrier per block (the tree had log2(256))
    # the control: eps passed as a Python float makes the float32 sqrt and divide f64
    (control,) = [r for r in ptx_report if r["control"]]
    assert control["f64_sqrt_div"] and control["kernel"] == "channel_stats"
    assert control["dtype"] != "float32"  # readers that check every "float32" row skip it


def test_simulator_requested_too_late_is_a_clear_error():
    code = (
        "import os; os.environ['NUMBA_ENABLE_CUDASIM'] = '0'\n"
        "from numba import cuda\n"
        "from bnlab.kernels import backend\n"
        "try:\n    backend.cuda_module(simulator=True)\n"
        "except RuntimeError as e:\n    print('ERR', e)\n"
    )
    proc = _python(code)
    assert "ERR numba.cuda was already imported as the real CUDA target" in proc.stdout
    assert "NUMBA_ENABLE_CUDASIM=1 before" in proc.stdout


def test_simulator_notice_when_no_gpu():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run(
        [sys.executable, "-c", "from bnlab.kernels import cuda as K; print(K.available())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if torch.cuda.is_available():
        assert proc.stdout.strip().endswith("gpu")
    else:  # the notice on stderr: a script's output (or a file it is sent to) stays clean
        assert "running on Numba's CUDA simulator" in proc.stderr
        assert proc.stdout == "simulator\n"


@pytest.mark.parametrize(
    "value, simulator",
    [("1", True), ("0", False), (" 1 ", True), ("+2", True), ("00", False), ("", None),
     (None, None), ("true", True), ("True", True), ("yes", True), ("on", True),
     ("false", False), ("NO", False), ("off", False)],
)  # fmt: skip
def test_numba_enable_cudasim_takes_numbers_as_numba_does_and_the_usual_words(value, simulator):
    assert backend.simulator_flag(value) is simulator


@pytest.mark.parametrize(
    "value, spelled", [("true", "1"), (" Off ", "0"), ("1", "1"), ("maybe", "maybe")]
)
def test_bnlab_kernels_spells_the_words_as_numbers_before_numba_reads_them(
    monkeypatch, value, spelled
):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", value)
    backend.spell_for_numba()
    assert os.environ["NUMBA_ENABLE_CUDASIM"] == spelled


def test_numba_enable_cudasim_that_means_nothing_is_refused_clearly():
    with pytest.raises(ValueError, match=r"NUMBA_ENABLE_CUDASIM='maybe'.*1 for Numba's CUDA sim"):
        backend.simulator_flag("maybe")


def test_the_simulator_notice_stays_out_of_stderr_in_a_notebook(monkeypatch, capsys):
    """A Jupyter kernel stores stderr in the notebook (in red); the notice goes to the cell."""

    class OutStream:  # stands in for ipykernel.iostream.OutStream, a kernel's sys.stderr
        __module__ = "ipykernel.iostream"

        def write(self, text):
            raise AssertionError("the notice went to the kernel's stderr")

        def flush(self):
            pass

    backend.announce_simulator()
    assert "CUDA simulator" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stderr", OutStream())
    backend.announce_simulator()
    assert "CUDA simulator" in capsys.readouterr().out


def test_missing_numba_cuda_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="pip install"):
        backend._require_numba_cuda()
