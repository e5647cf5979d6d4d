"""LeNet variants (with/without BN, sigmoid/ReLU) and small MLPs used across the course."""

from __future__ import annotations

from torch import nn

from bnlab import modules

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
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


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
