"""The networks of the course's experiments, and what is done to their layers.

- :func:`lenet`: LeNet-5 in d2l's shapes, with or without BN, sigmoid/ReLU/tanh (05, 06, 07);
- :func:`mlp`, :func:`mlp_stack`, :func:`dropout_mlp`: fully connected nets: plain, with BN and
  Dropout in any order (Li et al. 2019), or the one Dropout-before-BN net of notebook 06 (01, 08);
- :func:`small_cnn`: a two-conv CNN for the whole normalization family (08);
- :func:`small_resnet`, :class:`BasicBlock`, :func:`zero_init_last_gamma`: a CIFAR-style
  ResNet for 28x28 images, and Goyal et al. (2017)'s zero-gamma residual init (08);
- :func:`with_group_norm`: every BN swapped for GroupNorm (06);
- :func:`with_batch_renorm`: every BN swapped for Batch Renorm (Ioffe 2017) (06);
- :class:`NoisyShift`, :func:`add_noise_after_bn`: Santurkar et al. (2018)'s "noisy BN" (01, 08);
- :func:`init_xavier`, :func:`init_normal`, :func:`init_kaiming`, :func:`count_parameters`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnlab.nn import modules, norms, renorm
from bnlab.nn.hooks import batchnorm_layers, layers, replace_modules
from bnlab.nn.modules import is_batchnorm

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
BN_POSITIONS = ("before", "after")


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


def _validate_bn_position(bn_position: str) -> None:
    if bn_position not in BN_POSITIONS:
        raise ValueError(f"bn_position must be 'before' or 'after' (got {bn_position!r})")


def _block(
    layer: nn.Module, norm: nn.Module | None, act: nn.Module, bn_position: str
) -> list[nn.Module]:
    """[layer, norm, act] ("before": BN before the nonlinearity) or [layer, act, norm]."""
    if norm is None:
        return [layer, act]
    return [layer, norm, act] if bn_position == "before" else [layer, act, norm]


def lenet(
    bn: str | None = None,
    activation: str = "sigmoid",
    num_classes: int = 10,
    bn_position: str = "before",
) -> nn.Sequential:
    """LeNet-5 in Dive into Deep Learning's shapes, for (N, 1, 28, 28) input.

    conv(6, 5x5, pad 2) -> pool -> conv(16, 5x5) -> pool -> 120 -> 84 -> num_classes,
    average pooling. With ``bn`` ("torch" or "bnlab") a BatchNorm follows every conv
    and hidden linear layer, before the nonlinearity (``bn_position="before"``, as in
    Ioffe & Szegedy 2015) or after it (``"after"``); it normalizes as many channels either way.
    """
    act = _activation(activation)
    norms = _norm_layers(bn)
    _validate_bn_position(bn_position)

    def block(layer: nn.Module, width: int, norm_index: int) -> list[nn.Module]:
        norm = norms[norm_index](width) if norms is not None else None
        return _block(layer, norm, act(), bn_position)

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
    bn_position: str = "before",
) -> nn.Sequential:
    """A fully connected net of ``depth`` hidden layers of ``width`` units (flattens input).

    With ``bn``, BatchNorm1d sits between each hidden linear layer and its nonlinearity
    (``bn_position="before"``) or follows the nonlinearity (``"after"``).
    """
    act = _activation(activation)
    norms = _norm_layers(bn)
    _validate_bn_position(bn_position)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        norm = norms[0](width) if norms is not None else None
        layers += _block(nn.Linear(fan_in, width), norm, act(), bn_position)
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in layers(model, (nn.Conv2d, nn.Linear))]


def init_xavier(model: nn.Module, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weights for every Conv2d and Linear, biases left as they are (d2l's init).

    d2l's ``init_cnn`` / ``init_weights`` do exactly this before training LeNet (gain 1).
    Glorot & Bengio (2010) derive the scale for units of slope 1 at 0; the sigmoid's slope
    there is 1/4, and ``gain=4`` is the correction Bengio (2012, "Practical recommendations
    for gradient-based training of deep architectures", arXiv:1206.5533) gives for sigmoid
    units. Returns model.
    """
    if gain <= 0:
        raise ValueError(f"gain must be > 0 (got {gain})")
    for layer in _weighted_layers(model):
        nn.init.xavier_uniform_(layer.weight, gain=gain)
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


def init_kaiming(model: nn.Module) -> nn.Module:
    """Kaiming-normal weights (fan_in, ReLU gain) and zero biases for every Conv2d and Linear.

    The init ReLU nets need (He et al., 2015, "Delving Deep into Rectifiers"):
    std = sqrt(2 / fan_in) keeps the activations' scale through ReLU layers. Returns model.
    """
    for layer in _weighted_layers(model):
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
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


_RENORMABLE = {
    nn.BatchNorm1d: renorm.BatchRenorm1d,
    modules.BatchNorm1d: renorm.BatchRenorm1d,
    nn.BatchNorm2d: renorm.BatchRenorm2d,
    modules.BatchNorm2d: renorm.BatchRenorm2d,
}


def _renorm_like(bn: nn.Module, r_max: float, d_max: float) -> nn.Module:
    """A Batch Renorm layer with ``bn``'s eps, momentum, gamma, beta, running statistics,
    device, dtype and train/eval mode."""
    cls = next(new for old, new in _RENORMABLE.items() if isinstance(bn, old))
    momentum = 0.01 if bn.momentum is None else bn.momentum
    layer = cls(bn.num_features, bn.eps, momentum, r_max, d_max, affine=bn.weight is not None)
    layer.train(bn.training)
    like = next(bn.buffers(), None) if bn.weight is None else bn.weight
    if like is not None:
        layer.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            old, new = getattr(bn, name), getattr(layer, name)
            if old is not None and new is not None:
                new.copy_(old)
    return layer


def with_batch_renorm(model: nn.Module, r_max: float = 3.0, d_max: float = 5.0) -> nn.Module:
    """Replace every BatchNorm1d/2d (torch.nn's or bnlab's) by BatchRenorm1d/2d, in place.

    Each keeps its BN's gamma, beta, running statistics, eps and momentum (None, a
    cumulative average, becomes Batch Renorm's default 0.01). In eval mode the model
    computes what it computed before. ``r_max``, ``d_max``: see ``bnlab.nn.renorm``.
    Returns the model.
    """
    renorm.validate_renorm_args(1e-5, 0.01, r_max, d_max)
    found = [m for _, m in batchnorm_layers(model)]
    if not found:
        raise ValueError("the model has no BatchNorm layer to replace; build it with bn=...")
    if not all(isinstance(m, tuple(_RENORMABLE)) for m in found):
        raise ValueError("Batch Renorm comes as BatchRenorm1d/2d only; the model has another BN")
    return replace_modules(model, is_batchnorm, lambda bn: _renorm_like(bn, r_max, d_max))


# ----------------------------------------------------------------------------- ResNet


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """He et al. (2016)'s basic residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x)).

    s is the identity, or a strided 1x1 conv + BN (``downsample``, torchvision's name) when
    the block changes the width or the resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _residual_last_norms() -> list[tuple[type[nn.Module], str]]:
    """(block class, name of its last BN): bnlab's BasicBlock, torchvision's when installed."""
    kinds: list[tuple[type[nn.Module], str]] = [(BasicBlock, "bn2")]
    try:
        from torchvision.models import resnet
    except ImportError:  # torchvision is a course extra
        return kinds
    return kinds + [(resnet.BasicBlock, "bn2"), (resnet.Bottleneck, "bn3")]


def zero_init_last_gamma(model: nn.Module) -> nn.Module:
    """Set gamma = 0 in the last BN of every residual block, in place (zero-init residual).

    Goyal et al. 2017, "Accurate, Large Minibatch SGD" (arXiv:1706.02677), Sec. 5.1: each
    residual branch then outputs beta = 0, so every block starts as its shortcut. Blocks:
    bnlab's :class:`BasicBlock` and torchvision's BasicBlock (bn2) and Bottleneck (bn3), as
    torchvision's ``zero_init_residual=True``. Returns the model.
    """
    kinds = _residual_last_norms()
    blocks = layers(model, tuple(cls for cls, _ in kinds))
    last = [getattr(m, name) for _, m in blocks for cls, name in kinds if isinstance(m, cls)]
    if not last:
        raise ValueError("the model has no residual block (BasicBlock or Bottleneck)")
    for bn in last:
        if bn.weight is not None:
            nn.init.zeros_(bn.weight)
    return model


def _init_resnet(model: nn.Module) -> None:
    """torchvision's ResNet init: Kaiming-normal convs (fan_out, ReLU), BN gamma 1, beta 0."""
    for _, conv in layers(model, nn.Conv2d):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    for _, bn in layers(model, nn.BatchNorm2d):
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)


def small_resnet(
    num_blocks: Sequence[int] = (2, 2, 2),
    width: int = 16,
    num_classes: int = 10,
    in_channels: int = 1,
    zero_init_residual: bool = False,
) -> nn.Sequential:
    """A CIFAR-style ResNet (He et al. 2016, Sec. 4.2) for (N, in_channels, 28, 28) input.

    conv3x3(width) -> BN -> ReLU -> three stages of ``num_blocks`` :class:`BasicBlock`, of
    widths width, 2 width, 4 width (28x28, 14x14, 7x7: stages 2 and 3 start with stride 2
    and a 1x1 conv + BN shortcut) -> global average pool -> Linear(num_classes).
    torch.nn's BatchNorm2d, torchvision's init; ``zero_init_residual``: see
    :func:`zero_init_last_gamma`.
    """
    if len(num_blocks) != 3 or min(num_blocks) < 1:
        raise ValueError(f"num_blocks must be three counts >= 1 (got {tuple(num_blocks)})")
    stages, channels = [], width
    for i, count in enumerate(num_blocks):
        out = width * 2**i
        blocks = [BasicBlock(channels, out, stride=1 if i == 0 else 2)]
        blocks += [BasicBlock(out, out) for _ in range(count - 1)]
        stages.append(nn.Sequential(*blocks))
        channels = out
    model = nn.Sequential(
        _conv3x3(in_channels, width),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )
    _init_resnet(model)
    return zero_init_last_gamma(model) if zero_init_residual else model


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
