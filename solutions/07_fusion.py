"""Reference solutions for notebook 07 (fusion). Try the exercises yourself first.

Run ``python solutions/07_fusion.py`` to put every solution through its checker.
"""

import torch


def scale_shift(bn):
    """Eval-mode BN as a per-channel affine map y = scale * x + shift."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    return scale, shift


def fold(conv, bn):
    """(weight, bias) of the conv equal to ``conv`` followed by eval-mode ``bn``."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight.detach() * scale.view(-1, 1, 1, 1)
    b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
    bias = (b - bn.running_mean) * scale + bn.bias.detach()
    return weight, bias


def fold_into_next_linear(bn, linear):
    """(weight, bias) of the Linear equal to eval-mode ``bn`` (BatchNorm1d) then ``linear``.

    linear(scale * x + shift) = (W * scale) x + (b + W @ shift): BN scales the Linear's
    inputs, so the scale multiplies W's columns, and the shift passes through the weight.
    """
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return w * scale, b + w @ shift


if __name__ == "__main__":
    from bnlab.teaching import exercises

    for name, result in exercises.check_all(globals(), "07_fusion").items():
        print(f"{name}: {result}")
