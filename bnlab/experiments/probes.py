"""Probes: what the activations inside a network do, measured while it runs.

Each probe watches layers through :mod:`bnlab.nn.hooks` and leaves the model as it found it.

- :func:`layer_activations`: the outputs of every layer of one kind for one input
  (notebooks 01, 03's histograms);
- :class:`ShiftMonitor`: per-layer, per-step channel means and stds during training, and the
  covariate-shift statistic built from them (Santurkar et al. 2018; notebooks 01, 08);
- :func:`gradient_ics`: Santurkar et al.'s gradient-based internal covariate shift (08);
- :func:`moments`: per-channel mean, std, skewness and kurtosis of activations (08);
- :func:`signal_and_gradient`: pre-activation spread, saturation and per-layer gradient norms
  of a deep net on one batch (05);
- :func:`variance_shift`: each BN layer's test-time input variance over its running
  variance, the Dropout "variance shift" of Li et al. 2019 (06, 08).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bnlab.nn import hooks
from bnlab.nn.functional import reduce_dims

ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh)


@torch.no_grad()
def layer_activations(
    model: nn.Module, x: Tensor, kind: hooks.Kinds = nn.Tanh
) -> dict[str, Tensor]:
    """Outputs of every submodule of type ``kind`` for input ``x``, in forward order.

    Returns {name: (N, ...) tensor}. The model's train/eval mode is left as it is, so a
    BN model in training mode normalizes with the batch's statistics.
    """
    watched = hooks.layers(model, kind)
    if not watched:
        raise ValueError(f"the model has no submodule of type {kind}; pass kind=nn.Sigmoid etc.")
    with hooks.recording(watched, "output") as seen:
        model(x)
    return {name: calls[-1] for name, calls in seen.items()}


class ShiftMonitor:
    """Records, at every training forward, the per-channel mean and std of chosen layers.

    It also keeps the std of all their values (:meth:`spread`). By default it watches every
    nonlinearity's input: what the layer before (BN, noise) passes on, i.e. the distribution
    the next layer has to cope with. The covariate-shift statistic of a layer is how much
    that moves from one step to the next, averaged over steps and channels:

        shift = mean_t mean_c ( |mu_t,c - mu_t-1,c| + |sigma_t,c - sigma_t-1,c| )

    (a small version of the distribution plots in Santurkar et al. 2018, Fig. 2 and 5).
    Use as a context manager around training; only training-mode forwards are recorded.
    kinds: the layer types to watch; what: "input" or "output" of those layers.
    """

    def __init__(
        self, model: nn.Module, kinds: hooks.Kinds = ACTIVATIONS, what: str = "input"
    ) -> None:
        if what not in ("input", "output"):
            raise ValueError(f"what must be 'input' or 'output' (got {what!r})")
        self.model, self.what = model, what
        self.layers = hooks.layers(model, kinds)
        if not self.layers:
            raise ValueError(f"the model has no layer of type {kinds} to monitor")
        self.names = [name for name, _ in self.layers]
        self.means: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self.stds: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self.spreads: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self._names = {m: n for n, m in self.layers}
        self._hooked = None

    def _record(self, module: nn.Module, args: tuple, output: Tensor | None = None) -> None:
        if not module.training:
            return
        x = (args[0] if self.what == "input" else output).detach()
        dims = reduce_dims(x)
        name = self._names[module]
        self.means[name].append(x.mean(dims))
        self.stds[name].append(x.std(dims))
        self.spreads[name].append(x.std())

    def __enter__(self) -> ShiftMonitor:
        self._hooked = hooks.hooked(self._names, self._record, pre=self.what == "input")
        self._hooked.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooked.__exit__(*exc)
        self._hooked = None

    def spread(self) -> Tensor:
        """(steps, layers): the std of each layer's whole batch of values, at every step.

        Over examples *and* channels: a layer whose units sit saturated at different values
        has a large spread though each unit barely varies over the batch.
        """
        return torch.stack([torch.stack(self.spreads[n]) for n in self.names], dim=1)

    def shift(self, relative: bool = False) -> list[float]:
        """The covariate-shift statistic of each monitored layer, in forward order.

        relative: divide each step's change by the channel's std at the step before, so
        that the number is in units of the layer's own spread and means the same for
        networks whose activations have different scales (BN's input and the same layer's
        output in a network without BN).
        """
        out = []
        for name in self.names:
            if len(self.means[name]) < 2:
                raise ValueError("ShiftMonitor saw fewer than 2 training steps; train inside it")
            mu, sd = torch.stack(self.means[name]), torch.stack(self.stds[name])  # (steps, C)
            change = mu.diff(dim=0).abs() + sd.diff(dim=0).abs()
            if relative:
                change = change / sd[:-1].clamp_min(1e-12)
            out.append(change.mean().item())
        return out


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with none of its hooks: a probe's own forward passes must
    not reach the monitors watching the model (a ShiftMonitor would count them as steps)."""
    memo = {
        id(value): type(value)()
        for module in model.modules()
        for name, value in vars(module).items()
        if "hook" in name and isinstance(value, dict)
    }
    return copy.deepcopy(model, memo)


def _gradients(model: nn.Module, x: Tensor, y: Tensor, loss_fn) -> list[Tensor]:
    """The loss's gradient for every parameter of ``model``, in ``parameters()`` order."""
    loss = loss_fn(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def gradient_ics(
    model: nn.Module, x: Tensor, y: Tensor, lr: float, loss_fn=nn.functional.cross_entropy
) -> list[dict[str, float]]:
    """Santurkar et al.'s internal covariate shift, measured through the gradient, on one batch.

    Santurkar, Tsipras, Ilyas & Madry 2018 (arXiv:1805.11604), Definition 2.1: for layer i,
    G_i is the gradient of the loss with respect to its weights W_i; G'_i the same gradient
    after one SGD step (learning rate ``lr``, on this batch) has updated every parameter
    *before* layer i, layer i and those after it unchanged. If the updates of the layers
    before change what layer i should do, G'_i differs from G_i. Returns, for every
    Linear/Conv2d after the first, in forward order: {"l2": |G - G'| / |G|, "cosine":
    cos(G, G')}.

    Measured on copies in the model's current mode (training mode: batch statistics), so
    the model and its running statistics are left as they were, and without the model's
    hooks, so monitors watching it do not see these passes; every copy starts from the
    model's noise generators (noisy BN), so G and G' see the same noise.
    """
    names = [n for n, _ in model.named_parameters()]
    weights = [n for n, _ in hooks.layers(model, (nn.Linear, nn.Conv2d))]
    index = [names.index(f"{layer}.weight") for layer in weights]
    grads = _gradients(_copy_without_hooks(model), x, y, loss_fn)
    out = []
    for i in index[1:]:
        shifted = _copy_without_hooks(model)
        with torch.no_grad():
            for k, p in enumerate(shifted.parameters()):
                if k < i:  # the parameters of the layers before layer i
                    p.sub_(lr * grads[k])
        before, after = grads[i], _gradients(shifted, x, y, loss_fn)[i]
        cosine = nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0)
        out.append(
            {"l2": ((after - before).norm() / before.norm()).item(), "cosine": cosine.item()}
        )
    return out


def moments(x: Tensor) -> dict[str, float]:
    """Per-channel mean, std, skewness and excess kurtosis of (N, C, *) activations.

    Statistics are taken per channel over N and the spatial axes, then averaged over
    channels (the std of the per-channel means is reported too, to show they differ).
    A standard Gaussian has mean 0, std 1, skew 0, kurtosis 0.
    Returns {"mean", "mean_spread", "std", "skew", "kurtosis"}.
    """
    x = x.detach().double()
    dims = reduce_dims(x)
    mu = x.mean(dims, keepdim=True)
    sd = x.std(dims, unbiased=False, keepdim=True)
    z = (x - mu) / sd.clamp_min(1e-12)
    return {
        "mean": mu.mean().item(),
        "mean_spread": mu.flatten().std().item() if mu.numel() > 1 else 0.0,
        "std": sd.mean().item(),
        "skew": z.pow(3).mean(dims).mean().item(),
        "kurtosis": (z.pow(4).mean(dims) - 3).mean().item(),
    }


@torch.no_grad()
def variance_shift(model: nn.Module, x: Tensor, reduce: str = "mean") -> list[float]:
    """For each BN layer: (variance of its input in eval mode) / (its running variance).

    Li et al. 2019, "Understanding the Disharmony between Dropout and Batch Normalization
    by Variance Shift": Dropout scales kept units by 1/(1-p) in training, so the variance
    BN learns to expect differs from what it receives at test time. 1 means no shift,
    below 1 means BN expects more variance than it gets.
    reduce: "mean" or "median" of that ratio over channels. Returns one value per BN
    layer, in forward order; the model's modes are restored.
    """
    if reduce not in ("mean", "median"):
        raise ValueError(f"reduce must be 'mean' or 'median' (got {reduce!r})")
    bns = hooks.batchnorm_layers(model)
    if not bns:
        raise ValueError("the model has no BatchNorm layer")
    with hooks.preserved(model), hooks.recording(bns, "input") as seen:
        model.eval()
        model(x)
    ratios = []
    for name, bn in bns:
        z = seen[name][-1]
        ratio = z.var(dim=reduce_dims(z)) / bn.running_var
        ratios.append((ratio.mean() if reduce == "mean" else ratio.median()).item())
    return ratios


def subnormal_gradients(
    model: nn.Module, x: Tensor, y: Tensor, flush: bool = False, threads: int | None = None
) -> int:
    """How many gradient entries of one cross-entropy backward are float32 subnormals.

    Subnormals are the nonzero values below float32's smallest normal, 1.2e-38; a deeply
    saturated sigmoid network produces them (notebook 05). flush: run the backward with
    ``torch.set_flush_denormal`` on (:func:`bnlab.train.flush_denormals`); threads: torch's
    intra-op threads for the pass (restored afterwards). The gradients stay in ``.grad``.
    """
    from bnlab.experiments.train import flush_denormals

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        with flush_denormals(flush):
            nn.functional.cross_entropy(model(x), y).backward()
    finally:
        torch.set_num_threads(previous)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    tiny = torch.finfo(torch.float32).tiny
    return int(((grads != 0) & (grads.abs() < tiny)).sum())


def signal_and_gradient(
    model: nn.Module, x: Tensor, y: Tensor, kinds: hooks.Kinds = nn.Sigmoid, tail: float = 4.0
) -> dict[str, list[float]]:
    """Where a deep net's signal and gradient go, measured on one batch (notebook 05).

    Runs one forward and cross-entropy backward of ``model`` on (x, y), in its current mode.
    Returns, per nonlinearity of type ``kinds`` in forward order: "input std" (of its
    pre-activations), "in tails" (fraction with |z| > ``tail``: a sigmoid's flat tails start
    near 4, where its slope is below 0.018), "output std"; and per Conv2d/Linear weight in
    forward order: "grad norm". The gradients stay in ``.grad``.
    """
    acts = hooks.layers(model, kinds)
    if not acts:
        raise ValueError(f"the model has no layer of type {kinds}")
    with hooks.recording(acts, "input") as inputs, hooks.recording(acts, "output") as outputs:
        loss = nn.functional.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    z = [inputs[name][-1] for name, _ in acts]
    return {
        "input std": [t.std().item() for t in z],
        "in tails": [(t.abs() > tail).float().mean().item() for t in z],
        "output std": [outputs[name][-1].std().item() for name, _ in acts],
        "grad norm": [
            m.weight.grad.norm().item() for _, m in hooks.layers(model, (nn.Conv2d, nn.Linear))
        ],
    }
