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


@pytest.mark.parametrize("split", [2, 3])
def test_split_statistics_equal_one_block_per_channel(split):
    x, *_ = _data((3, 2, 5, 5), torch.float64)
    one = K.channel_stats(x, split=1)
    many = K.channel_stats(x, split=split)
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


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
    assert {(r["kernel"], r["dtype"]) for r in ptx_report} == {
        (k, d) for k in kernels for d in ("float32", "float64")
    }
    for r in ptx_report:
        assert r["entry"], r["kernel"]
        if r["dtype"] == "float32":
            assert r["f64"] == [], (r["kernel"], r["f64"][:3])
        else:  # the detector does see float64 arithmetic when it is there
            assert r["f64"], r["kernel"]


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
