"""Reference solutions for notebook 06 (pitfalls). Try the exercises yourself first.

Run ``python solutions/06_pitfalls.py`` to put every solution through its checker.
"""

import torch
from torch import nn


def predict(model, x):
    """Logits for x in eval mode (running statistics), the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)


def keras_to_torch(momentum, epsilon):
    """Keras' BatchNormalization(momentum, epsilon) as PyTorch's (momentum, eps): Keras'
    momentum weighs the old value, PyTorch's the new one; epsilon means the same."""
    return 1.0 - momentum, epsilon


def recalibrate(model, batches):
    """Re-estimate every BN's running statistics from ``batches``: reset, an equal-weight
    (cumulative) average with momentum=None, then momentum and mode put back."""
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)


if __name__ == "__main__":
    from bnlab.teaching import exercises

    for name, result in exercises.check_all(globals(), "06_pitfalls").items():
        print(f"{name}: {result}")
