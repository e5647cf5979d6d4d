"""Measuring tools for notebook 08, which tests common claims about BatchNorm.

Training, evaluation and sweeps come from ``bnlab.train`` and ``bnlab.sweeps``; this
module holds only what those claims need on top:

- :class:`NoisyShift` and :func:`add_noise_after_bn`: Santurkar et al. (2018)'s "noisy BN",
  random time-varying shifts and scales injected after every BN layer;
- :class:`ShiftMonitor`: a per-layer covariate-shift statistic, recorded at every step;
- :func:`moments`: per-channel mean, std, skewness and kurtosis of activations;
- :func:`accuracy_with_batch_stats`, :func:`class_sorted`: what eval mode would give if BN
  used the test batch's statistics;
- :func:`mlp_stack`, :func:`generalization_gap`, :func:`variance_shift`: BN and Dropout in
  either order (Li et al., 2019), and the train/test gap;
- :func:`small_cnn`: one CNN for the whole normalization family (``bnlab.norms``);
- :func:`epochs_to`: epochs until a history first reaches a target accuracy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from bnlab import modules, norms
from bnlab.data import TensorLoader
from bnlab.functional import reduce_dims
from bnlab.modules import BATCH_NORMS
from bnlab.train import History, evaluate

ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh)

# ----------------------------------------------------------------------------- noisy BN


class NoisyShift(nn.Module):
    """Random per-channel scale and shift that change at every training step.

    Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?", Sec. 2.1:
    after each BN layer they add noise "sampled from a non-zero mean and non-unit variance
    distribution", redrawn at each step, so the next layer sees a severely shifting input
    distribution. Here, at each training forward, every channel c draws

        scale_c ~ U(1, 1 + strength),   shift_c ~ U(-strength, strength)

    and every activation gets its own noise around them:
    ``y = x * (scale_c + 0.1 strength n1) + shift_c + 0.1 strength n2``, n1, n2 ~ N(0, 1).
    In eval mode the noise is replaced by its expectation: ``y = (1 + strength / 2) x``.

    Input and output: (N, C, *).
    """

    def __init__(self, num_features: int, strength: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if strength < 0:
            raise ValueError(f"strength must be >= 0 (got {strength})")
        self.num_features, self.strength = num_features, strength
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        s = self.strength
        if not self.training or s == 0:
            return x * (1 + s / 2)
        shape = (1, self.num_features, *([1] * (x.dim() - 2)))
        g = self.generator
        scale = 1 + s * torch.rand(shape, generator=g)
        shift = s * (2 * torch.rand(shape, generator=g) - 1)
        n1 = torch.randn(x.shape, generator=g)
        n2 = torch.randn(x.shape, generator=g)
        return x * (scale + 0.1 * s * n1).to(x) + (shift + 0.1 * s * n2).to(x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, strength={self.strength}"


def add_noise_after_bn(model: nn.Module, strength: float = 1.0, seed: int = 0) -> nn.Module:
    """Replace every BatchNorm ``bn`` in ``model`` by ``Sequential(bn, NoisyShift)``, in place.

    Each noise layer gets its own seed (seed, seed + 1, ...). Returns the model.
    """
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for name, child in parent.named_children():
            if isinstance(child, BATCH_NORMS):
                noise = NoisyShift(child.num_features, strength, seed + count)
                setattr(parent, name, nn.Sequential(child, noise))
                count += 1
            else:
                visit(child)

    visit(model)
    if count == 0:
        raise ValueError(
            "the model has no BatchNorm layer to add noise after; build it with bn=..."
        )
    return model


# ----------------------------------------------------------------------------- covariate shift


class ShiftMonitor:
    """Records, at each training step, the per-channel mean and std of every nonlinearity's input.

    That input is what the layer after BN (and noise) passes on, i.e. the distribution the
    next layer has to cope with. The covariate-shift statistic of a layer is how much it
    moves from one step to the next, averaged over steps and channels:

        shift = mean_t mean_c ( |mu_t,c - mu_t-1,c| + |sigma_t,c - sigma_t-1,c| )

    (a small version of the distribution plots in Santurkar et al. 2018, Fig. 2 and 5).
    Use as a context manager around ``fit``; only training-mode forwards are recorded.
    """

    def __init__(self, model: nn.Module, kinds: tuple[type[nn.Module], ...] = ACTIVATIONS):
        self.model = model
        self.names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        if not self.names:
            raise ValueError(f"the model has no layer of type {kinds} to monitor")
        self.means: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self.stds: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self._hooks: list = []

    def _record(self, name: str, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if not module.training:
            return
        x = inputs[0].detach()
        dims = reduce_dims(x)
        self.means[name].append(x.mean(dims))
        self.stds[name].append(x.std(dims))

    def __enter__(self) -> ShiftMonitor:
        modules_by_name = dict(self.model.named_modules())
        for name in self.names:
            hook = modules_by_name[name].register_forward_pre_hook(
                lambda m, inp, name=name: self._record(name, m, inp)
            )
            self._hooks.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def shift(self) -> list[float]:
        """The covariate-shift statistic of each monitored layer, in forward order."""
        out = []
        for name in self.names:
            if len(self.means[name]) < 2:
                raise ValueError("ShiftMonitor saw fewer than 2 training steps; train inside it")
            mu, sd = torch.stack(self.means[name]), torch.stack(self.stds[name])  # (steps, C)
            step = (mu.diff(dim=0).abs() + sd.diff(dim=0).abs()).mean()
            out.append(step.item())
        return out


# ----------------------------------------------------------------------------- distributions


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


# ----------------------------------------------------------------------------- eval mode


@torch.no_grad()
def accuracy_with_batch_stats(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Accuracy if BN normalized each test batch with that batch's own statistics.

    Evaluates a deep copy whose BN layers are in training mode (dropout etc. stay in
    eval), so the model and its running statistics are left untouched.
    """
    probe = copy.deepcopy(model).eval()
    for m in probe.modules():
        if isinstance(m, BATCH_NORMS):
            m.train()
    correct = count = 0
    for x, y in batches:
        correct += (probe(x).argmax(1) == y).sum().item()
        count += len(y)
    return correct / count


def class_sorted(loader: TensorLoader, batch_size: int | None = None) -> TensorLoader:
    """The loader's examples sorted by label, unshuffled: most batches hold a single class."""
    order = torch.argsort(loader.y, stable=True)
    return TensorLoader(loader.x[order], loader.y[order], batch_size or loader.batch_size)


# ----------------------------------------------------------------------------- BN and Dropout


def mlp_stack(
    order: Sequence[str],
    depth: int = 3,
    width: int = 256,
    p: float = 0.5,
    in_features: int = 784,
    num_classes: int = 10,
    seed: int | None = None,
) -> nn.Sequential:
    """An MLP of ``depth`` hidden blocks, each the layers named in ``order``, in that order.

    order: names from "linear", "bn" (bnlab BatchNorm1d), "relu", "dropout" (rate p), e.g.
    ("linear", "bn", "relu", "dropout") or ("linear", "dropout", "bn", "relu").
    A final Linear maps to ``num_classes``. Input (N, 1, 28, 28) or (N, 784) is flattened.
    """
    known = {"linear", "bn", "relu", "dropout"}
    if "linear" not in order or not set(order) <= known:
        raise ValueError(f"order must contain 'linear' and only names from {sorted(known)}")
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        for name in order:
            if name == "linear":
                layers.append(nn.Linear(fan_in, width))
                fan_in = width
            elif name == "bn":
                layers.append(modules.BatchNorm1d(fan_in))
            elif name == "relu":
                layers.append(nn.ReLU())
            else:
                layers.append(nn.Dropout(p))
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def generalization_gap(model: nn.Module, data) -> dict[str, float]:
    """Train and test accuracy of a trained model, both in eval mode, and their difference.

    (History.train_acc is measured during training, with Dropout active; the gap must
    compare the same function on both sets.) Returns {"train", "test", "gap"}.
    """
    _, train = evaluate(model, data.train)
    _, test = evaluate(model, data.test)
    return {"train": train, "test": test, "gap": train - test}


@torch.no_grad()
def variance_shift(model: nn.Module, x: Tensor) -> list[float]:
    """For each BN layer: (variance of its input in eval mode) / (its running variance).

    Li et al. 2019, "Understanding the Disharmony between Dropout and Batch Normalization
    by Variance Shift": Dropout scales kept units by 1/(1-p) in training, so the variance
    BN learns to expect differs from what it receives at test time. 1 means no shift.
    Returns the per-layer mean over channels of that ratio, in forward order.
    """
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    if not bns:
        raise ValueError("the model has no BatchNorm layer")
    seen: dict[nn.Module, Tensor] = {}
    hooks = [bn.register_forward_pre_hook(lambda m, inp: seen.__setitem__(m, inp[0])) for bn in bns]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    ratios = []
    for bn in bns:
        z = seen[bn]
        var = z.var(dim=reduce_dims(z))
        ratios.append((var / bn.running_var).mean().item())
    return ratios


# ----------------------------------------------------------------------------- norms, epochs


def small_cnn(norm: str = "batch", width: int = 16, groups: int = 4) -> nn.Sequential:
    """A two-conv CNN for (N, 1, 28, 28) input with the norm ``norm`` after each conv.

    conv3x3(width) -> norm -> ReLU -> maxpool -> conv3x3(2 width) -> norm -> ReLU ->
    maxpool -> Linear(10). norm: a ``bnlab.norms.make_norm2d`` kind.
    Convs have no bias when a norm follows (its beta plays that role).
    """
    bias = norm == "none"
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=bias),
        norms.make_norm2d(norm, width, groups),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=bias),
        norms.make_norm2d(norm, 2 * width, groups),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 7 * 7, 10),
    )


def epochs_to(history: History, target: float, key: str = "test_acc") -> float:
    """The first epoch (1-based) at which ``history.<key>`` reaches ``target``; inf if never."""
    for epoch, value in enumerate(getattr(history, key), start=1):
        if value >= target:
            return epoch
    return math.inf
