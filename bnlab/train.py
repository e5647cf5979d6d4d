"""Training and evaluation loops with a progress bar and a per-epoch history.

``fit`` is the d2l ``train_ch6`` loop made reproducible: SGD on cross-entropy (mean over
the batch), one evaluation on the test set per epoch in ``model.eval()`` under
``torch.no_grad()``, and a ``History`` of train loss, train accuracy, test accuracy and
seconds per epoch. With the same seed it gives the same history on CPU.

Denormals: a saturated sigmoid outputs values within 1e-38 of 0 or 1, and its gradients
and the updates built from them then fall into float32's subnormal range, which x86 CPUs
handle in slow microcode. ``fit(flush_denormal=True)`` asks the CPU to flush them to zero
(``torch.set_flush_denormal``); the numbers change by less than 1.2e-38 each. The flag is
per CPU thread and torch sets it for the calling thread only: with several intra-op threads
some subnormals survive (measured in notebook 05), so flushing is complete on one thread.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from bnlab.config import seed_everything


class ProgressBar(tqdm):
    """``tqdm.auto.tqdm`` (notebook bar or terminal bar) that ends on its final count.

    tqdm redraws at most every ``mininterval`` seconds, so a bar can keep the text of its
    last redraw ("93% 14/15") beside a full bar; this one redraws once more when it closes.
    Keep tqdm's ``leave=True`` in notebooks: a bar closed with ``leave=False`` is saved
    hidden, and a reader of the stored notebook sees a blank line instead of how long the
    step took.
    """

    def close(self) -> None:
        if not self.disable:
            self.refresh()
        super().close()


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


@dataclass
class History:
    """Per-epoch measurements of one training run; every list has one entry per epoch."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[float]]:
        """The history as a plain dict of lists (for JSON or pandas)."""
        return asdict(self)

    @property
    def final_test_acc(self) -> float:
        """Test accuracy after the last epoch."""
        return self.test_acc[-1]


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush float32 subnormals to zero inside the block; yields whether the CPU supports it.

    torch has no getter for the setting, so on exit it is switched back off (torch's default).
    It applies to the calling thread only, not to torch's intra-op worker threads.
    """
    supported = torch.set_flush_denormal(enabled)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(False)


def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device=None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches`` of (x, y).

    Runs in ``model.eval()`` (BN uses its running statistics) under ``torch.no_grad()``,
    then puts the model back in the mode it found it in.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for x, y in batches:
                if device is not None:
                    x, y = x.to(device), y.to(device)
                logits = model(x)
                loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(dim=1) == y).sum().item()
                count += len(y)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate got no batches: the loader is empty")
    return loss_sum / count, correct / count


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, **kwargs
) -> torch.optim.Optimizer:
    """An optimizer by name ("sgd", "adam", "adamw") with learning rate ``lr``."""
    try:
        cls = _OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)} (got {name!r})") from None
    if lr <= 0:
        raise ValueError(f"lr must be > 0 (got {lr})")
    return cls(params, lr=lr, **kwargs)


def fit(
    model: nn.Module,
    data,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    seed: int | None = 0,
    flush_denormal: bool = True,
    progress: bool = True,
    device=None,
    callback: Callable[[int, History], None] | None = None,
    **optimizer_kwargs,
) -> History:
    """Train ``model`` on ``data.train`` for ``epochs`` epochs, evaluating on ``data.test``.

    data: anything with ``train`` and ``test`` iterables of (x (N, 1, 28, 28), y (N,)),
        e.g. ``bnlab.data.fashion_mnist(...)``; ``train.reseed(seed)`` is called if present.
    seed: seeds torch and the train loader's shuffling (None leaves both as they are).
        The model's initial weights are the caller's: seed before building the model.
    flush_denormal: flush float32 subnormals to zero during training (see module docstring).
    callback: called as callback(epoch, history) after each epoch.
    Returns the History; the model is left in training mode, trained.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (got {epochs})")
    if seed is not None:
        seed_everything(seed)
        if hasattr(data.train, "reseed"):
            data.train.reseed(seed)
    if device is not None:
        model.to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr, **optimizer_kwargs)
    history = History()
    bar = ProgressBar(range(epochs), desc="epochs", disable=not progress)
    with flush_denormals(flush_denormal):
        for epoch in bar:
            start = time.perf_counter()
            model.train()
            loss_sum, correct, count = 0.0, 0, 0
            for x, y in data.train:
                if device is not None:
                    x, y = x.to(device), y.to(device)
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(dim=1) == y).sum().item()
                count += len(y)
            _, test_acc = evaluate(model, data.test, device)
            history.train_loss.append(loss_sum / count)
            history.train_acc.append(correct / count)
            history.test_acc.append(test_acc)
            history.seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", test_acc=f"{test_acc:.3f}")
            if callback is not None:
                callback(epoch, history)
    model.train()
    return history
