"""The networks of the course's experiments, and what is done to their layers.

- :func:`lenet`: LeNet-5 in d2l's shapes, with or without BN, sigmoid/ReLU/tanh (05, 06, 07);
- :func:`mlp`, :func:`mlp_stack`, :func:`dropout_mlp`: fully connected nets: plain, with BN and
  Dropout in any order (Li et al. 2019), or the one Dropout-before-BN net of notebook 06 (01, 08);
- :func:`small_cnn`: a two-conv CNN for the whole normalization family (08);
- :func:`with_group_norm`: every BN swapped for GroupNorm (06);
- :class:`NoisyShift`, :func:`add_noise_after_bn`: Santurkar et al. (2018)'s "noisy BN" (01, 08);
- :func:`init_xavier`, :func:`init_normal`, :func:`count_parameters`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnlab.nn import modules, norms
from bnlab.nn.hooks import layers, replace_modules
from bnlab.nn.modules import is_batchnorm

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> type[nn.Module]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)} (got {name!r})"
        ) from None


def _norm_layers(bn: str | None) -> tuple[type[nn.Module], type[nn.Module]] | None:
    """(BatchNorm1d, BatchNorm2d) classes for ``bn`` = "torch" or "bnlab"; None for no BN."""
    if bn is None:
        return None
    if bn == "torch":
        return nn.BatchNorm1d, nn.BatchNorm2d
    if bn == "bnlab":
        return modules.BatchNorm1d, modules.BatchNorm2d
    raise ValueError(f"bn must be None, 'torch' or 'bnlab' (got {bn!r})")


def lenet(
    bn: str | None = None, activation: str = "sigmoid", num_classes: int = 10
) -> nn.Sequential:
    """LeNet-5 in Dive into Deep Learning's shapes, for (N, 1, 28, 28) input.

    conv(6, 5x5, pad 2) -> pool -> conv(16, 5x5) -> pool -> 120 -> 84 -> num_classes,
    average pooling. With ``bn`` ("torch" or "bnlab") a BatchNorm follows every conv
    and hidden linear layer, before the nonlinearity.
    """
    act = _activation(activation)
    norms = _norm_layers(bn)

    def block(layer: nn.Module, width: int, norm_index: int) -> list[nn.Module]:
        layers = [layer]
        if norms is not None:
            layers.append(norms[norm_index](width))
        layers.append(act())
        return layers

    return nn.Sequential(
        *block(nn.Conv2d(1, 6, kernel_size=5, padding=2), 6, 1),
        nn.AvgPool2d(kernel_size=2, stride=2),
        *block(nn.Conv2d(6, 16, kernel_size=5), 16, 1),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        *block(nn.Linear(16 * 5 * 5, 120), 120, 0),
        *block(nn.Linear(120, 84), 84, 0),
        nn.Linear(84, num_classes),
    )


def mlp(
    in_features: int = 784,
    width: int = 100,
    depth: int = 6,
    num_classes: int = 10,
    bn: str | None = None,
    activation: str = "tanh",
) -> nn.Sequential:
    """A fully connected net of ``depth`` hidden layers of ``width`` units (flattens input).

    With ``bn``, BatchNorm1d sits between each hidden linear layer and its nonlinearity.
    """
    act = _activation(activation)
    norms = _norm_layers(bn)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width))
        if norms is not None:
            layers.append(norms[0](width))
        layers.append(act())
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in layers(model, (nn.Conv2d, nn.Linear))]


def init_xavier(model: nn.Module) -> nn.Module:
    """Xavier-uniform weights for every Conv2d and Linear, biases left as they are (d2l's init).

    d2l's ``init_cnn`` / ``init_weights`` do exactly this before training LeNet. Returns model.
    """
    for layer in _weighted_layers(model):
        nn.init.xavier_uniform_(layer.weight)
    return model


def init_normal(model: nn.Module, std: float) -> nn.Module:
    """Weights ~ N(0, std^2) and zero biases for every Conv2d and Linear (CS231n's weight_scale).

    BN layers keep gamma=1, beta=0. Returns model.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0 (got {std})")
    for layer in _weighted_layers(model):
        nn.init.normal_(layer.weight, 0.0, std)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return model


def count_parameters(model: nn.Module) -> int:
    """The number of learnable values (weights, biases, gamma, beta) in ``model``."""
    return sum(p.numel() for p in model.parameters())


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


def dropout_mlp(dropout_first: bool = True, p: float = 0.5) -> nn.Sequential:
    """784 -> 256 -> ReLU -> [Dropout, 128, BN | 128, BN, Dropout] -> ReLU -> 10 (notebook 06).

    dropout_first=True puts Dropout before the Linear whose output BN normalizes, which
    carries Dropout's train/test variance shift into BN (Li et al. 2019).
    """
    drop, norm = nn.Dropout(p), nn.BatchNorm1d(128)
    middle = (
        [drop, nn.Linear(256, 128), norm] if dropout_first else [nn.Linear(256, 128), norm, drop]
    )
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), *middle, nn.ReLU(), nn.Linear(128, 10)
    )


def small_cnn(norm: str = "batch", width: int = 16, groups: int = 4) -> nn.Sequential:
    """A two-conv CNN for (N, 1, 28, 28) input with the norm ``norm`` after each conv.

    conv3x3(width) -> norm -> ReLU -> maxpool -> conv3x3(2 width) -> norm -> ReLU ->
    maxpool -> Linear(10). norm: a ``bnlab.nn.norms.make_norm2d`` kind.
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


def with_group_norm(model: nn.Module, groups: int = 4) -> nn.Module:
    """Replace every BatchNorm in ``model`` by a GroupNorm over the same channels, in place.

    Each GroupNorm uses gcd(channels, groups) groups, so every channel count works.
    Returns the model.
    """
    return replace_modules(
        model,
        is_batchnorm,
        lambda bn: nn.GroupNorm(math.gcd(bn.num_features, groups), bn.num_features),
    )


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

    Each noise layer gets its own seed (seed, seed + 1, ...), in module order. Returns the model.
    """
    added: list[NoisyShift] = []

    def with_noise(bn: nn.Module) -> nn.Module:
        added.append(NoisyShift(bn.num_features, strength, seed + len(added)))
        return nn.Sequential(bn, added[-1])

    replace_modules(model, is_batchnorm, with_noise)
    if not added:
        raise ValueError(
            "the model has no BatchNorm layer to add noise after; build it with bn=..."
        )
    return model
