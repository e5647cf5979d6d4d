"""The course's one training loop and one accuracy: every notebook that trains uses these.

- :func:`train_step`: forward, cross-entropy, backward, optimizer step;
- :func:`train_steps`: one step per batch of any iterable of (x, y), e.g.
  :class:`RandomBatches`, with the loss of every step (notebooks 01, 04, 06, 07);
- :func:`train_epoch`: one pass over a loader, with its mean loss and accuracy;
- :func:`evaluate` / :func:`accuracy`: loss and accuracy over batches, in eval mode unless
  told otherwise; :func:`accuracy_with_batch_stats` and :func:`generalization_gap` (08);
- :func:`fit`: epochs of :func:`train_epoch` and an evaluation each, with a ``History``.

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
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from bnlab.config import seed_everything
from bnlab.nn.hooks import batchnorm_layers


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
    """Measurements of one training run.

    Per epoch: train_loss, train_acc (on each batch as it was trained on), seconds, and
    val_acc when the data has a validation set. test_acc holds one entry per epoch, one
    (after the last epoch) or none, as ``fit``'s ``test`` asked. With ``fit(eval_every=k)``,
    curve_steps and curve_val hold the validation accuracy every k optimizer steps.
    """

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    curve_steps: list[int] = field(default_factory=list)
    curve_val: list[float] = field(default_factory=list)
    steps: int = 0

    def as_dict(self) -> dict[str, list[float]]:
        """The history as a plain dict of lists (for JSON or pandas)."""
        return asdict(self)

    @property
    def final_test_acc(self) -> float:
        """Test accuracy after the last epoch."""
        if not self.test_acc:
            raise ValueError(
                "this run never read the test set (fit(test='never'), a selection run); "
                "select on final_val_acc, then train the chosen setting with test='final'"
            )
        return self.test_acc[-1]

    @property
    def final_val_acc(self) -> float:
        """Validation accuracy after the last epoch."""
        if not self.val_acc:
            raise ValueError("this run had no validation set: build the data with n_val=...")
        return self.val_acc[-1]

    def epochs_to(self, target: float, key: str = "test_acc") -> float:
        """The first epoch (1-based) at which ``<key>`` reaches ``target``; inf if never."""
        for epoch, value in enumerate(getattr(self, key), start=1):
            if value >= target:
                return epoch
        return math.inf

    def steps_to(self, target: float) -> float:
        """The first optimizer step at which validation accuracy reached ``target``; inf if
        never within the run (its cap). Needs ``fit(eval_every=k)``: resolution k steps."""
        if not self.curve_steps:
            raise ValueError("steps_to needs a validation curve: fit(..., eval_every=k)")
        for step, value in zip(self.curve_steps, self.curve_val, strict=True):
            if value >= target:
                return step
        return math.inf


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
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device=None,
    eval_mode: bool = True,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches`` of (x, y).

    Runs under ``torch.no_grad()`` in ``model.eval()`` (BN uses its running statistics),
    then puts the model back in the mode it found it in. ``eval_mode=False`` keeps the
    model's current mode instead: the evaluation loop as it is often written, without
    ``model.eval()`` (notebook 06 measures what that costs).
    """
    was_training = model.training
    if eval_mode:
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


def accuracy(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eval_mode: bool = True
) -> float:
    """The fraction of correct predictions over ``batches`` (see :func:`evaluate`)."""
    return evaluate(model, batches, eval_mode=eval_mode)[1]


@torch.no_grad()
def accuracy_with_batch_stats(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Accuracy if BN normalized each test batch with that batch's own statistics.

    Evaluates a deep copy whose BN layers are in training mode (dropout etc. stay in
    eval), so the model and its running statistics are left untouched.
    """
    probe = copy.deepcopy(model).eval()
    for _, bn in batchnorm_layers(probe):
        bn.train()
    return accuracy(probe, batches, eval_mode=False)


def generalization_gap(model: nn.Module, data) -> dict[str, float]:
    """Train and test accuracy of a trained model, both in eval mode, and their difference.

    (History.train_acc is measured during training, with Dropout active; the gap must
    compare the same function on both sets.) Returns {"train", "test", "gap"}.
    """
    train, test = accuracy(model, data.train), accuracy(model, data.test)
    return {"train": train, "test": test, "gap": train - test}


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


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimization step on ``loss_fn(model(x), y)``, the batch's mean cross-entropy.

    Forward, clear the old gradients, backward, ``optimizer.step()``. Returns the loss and
    the model's output, both detached (the caller may count correct predictions with them).
    The gradients stay in ``.grad`` until the next step clears them.
    """
    logits = model(x)
    loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device=None,
    after_step: Callable[[], bool] | None = None,
) -> tuple[float, float]:
    """One :func:`train_step` per batch, in training mode; returns (mean loss, accuracy).

    Both are averaged over examples, measured on each batch as it was trained on.
    after_step: called after every optimizer step (e.g. to evaluate every k steps); the
    model is put back in training mode after it, and the epoch ends early when it
    returns True.
    """
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        loss, logits = train_step(model, optimizer, x, y)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(dim=1) == y).sum().item()
        count += len(y)
        if after_step is not None:
            stop = after_step()
            model.train()
            if stop:
                break
    if count == 0:
        raise ValueError("train_epoch got no batches: the loader is empty")
    return loss_sum / count, correct / count


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    progress: bool = True,
    desc: str = "steps",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
) -> list[float]:
    """One :func:`train_step` per batch of ``batches``, in training mode; the loss of each step.

    batches: any iterable of (x, y): a loader, a list, or :class:`RandomBatches`. With
    ``progress`` a bar counts the steps (its total is known when ``batches`` has a length).
    loss_fn: as in :func:`train_step` (e.g. ``nn.functional.mse_loss`` for a regression).
    """
    model.train()
    losses = []
    for x, y in ProgressBar(batches, desc=desc, disable=not progress):
        losses.append(train_step(model, optimizer, x, y, loss_fn)[0].item())
    return losses


class RandomBatches:
    """``steps`` mini-batches drawn at random, with replacement, from (x, y).

    Each step draws ``batch_size`` indices with ``torch.randint`` from its own generator
    seeded with ``seed``: the sampling of SGD's analysis, and the same batches in every run.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int = 0
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length (got {len(x)} and {len(y)})")
        if batch_size < 1 or steps < 0:
            raise ValueError(f"need batch_size >= 1 and steps >= 0 (got {batch_size}, {steps})")
        self.x, self.y, self.batch_size, self.steps, self.seed = x, y, batch_size, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            idx = torch.randint(0, len(self.x), (self.batch_size,), generator=g)
            yield self.x[idx], self.y[idx]


TEST_POLICIES = ("epochs", "final", "never")


class _Evaluations:
    """What ``fit`` measures besides training: the validation curve, the per-epoch
    validation and test accuracy, and whether the run has reached its ``stop_at``."""

    def __init__(self, model, data, device, test, eval_every, stop_at, history) -> None:
        self.model, self.data, self.device, self.history = model, data, device, history
        self.test, self.eval_every, self.stop_at = test, eval_every, stop_at
        self.val = getattr(data, "val", None)

    def reached(self) -> bool:
        """Whether the last point of the validation curve reached ``stop_at``."""
        curve = self.history.curve_val
        return self.stop_at is not None and bool(curve) and curve[-1] >= self.stop_at

    def after_step(self) -> bool:
        """Count the step, evaluate when due; whether to stop (the threshold is reached)."""
        h = self.history
        h.steps += 1
        if self.eval_every is not None and h.steps % self.eval_every == 0:
            h.curve_steps.append(h.steps)
            h.curve_val.append(evaluate(self.model, self.val, self.device)[1])
            return self.reached()
        return False

    def end_epoch(self, last: bool) -> dict[str, str]:
        """Validation (every epoch) and test (as ``test`` asks) accuracy; what the bar shows."""
        h, shown = self.history, {}
        if self.val is not None:
            at_curve = h.curve_steps and h.curve_steps[-1] == h.steps  # measured just now
            h.val_acc.append(
                h.curve_val[-1] if at_curve else evaluate(self.model, self.val, self.device)[1]
            )
            shown["val_acc"] = f"{h.val_acc[-1]:.3f}"
        if self.test == "epochs" or (self.test == "final" and last):
            h.test_acc.append(evaluate(self.model, self.data.test, self.device)[1])
            shown["test_acc"] = f"{h.test_acc[-1]:.3f}"
        return shown


def _check_fit_args(data, epochs: int, test: str, eval_every, stop_at) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (got {epochs})")
    if test not in TEST_POLICIES:
        raise ValueError(f"test must be one of {TEST_POLICIES} (got {test!r})")
    val = getattr(data, "val", None)
    if eval_every is not None and (eval_every < 1 or val is None):
        raise ValueError(
            f"eval_every needs a validation set and a step count >= 1 (got {eval_every}, "
            f"data.val {'missing: build the data with n_val=...' if val is None else 'present'})"
        )
    if stop_at is not None and eval_every is None:
        raise ValueError("stop_at needs eval_every: the curve on which the threshold is checked")


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
    test: str = "epochs",
    eval_every: int | None = None,
    stop_at: float | None = None,
    **optimizer_kwargs,
) -> History:
    """Train ``model`` on ``data.train`` for ``epochs`` epochs, evaluating as asked.

    data: anything with ``train`` and ``test`` iterables of (x (N, 1, 28, 28), y (N,)),
        e.g. ``bnlab.data.fashion_mnist(...)``; ``train.reseed(seed)`` is called if present.
        When it has a ``val`` loader (``fashion_mnist(n_val=...)``), validation accuracy is
        measured after every epoch (``History.val_acc``).
    seed: seeds torch and the train loader's shuffling (None leaves both as they are).
        The model's initial weights are the caller's: seed before building the model.
    flush_denormal: flush float32 subnormals to zero during training (see module docstring).
    callback: called as callback(epoch, history) after each epoch.
    test: "epochs" evaluates the test set after every epoch (d2l's loop), "final" once
        when the run ends (a reported run), "never" not at all (a selection run, whose
        choices must rest on validation accuracy alone).
    eval_every: also measure validation accuracy every ``eval_every`` optimizer steps
        (``History.curve_steps``, ``curve_val``, :meth:`History.steps_to`); needs ``data.val``.
    stop_at: end training at the first validation point of the curve that reaches this
        accuracy (a run that measures only its steps to a threshold); needs ``eval_every``.
        The epoch in progress ends there: its entries cover the steps it made.
    Returns the History; the model is left in training mode, trained.
    """
    _check_fit_args(data, epochs, test, eval_every, stop_at)
    if seed is not None:
        seed_everything(seed)
        if hasattr(data.train, "reseed"):
            data.train.reseed(seed)
    if device is not None:
        model.to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr, **optimizer_kwargs)
    history = History()
    run = _Evaluations(model, data, device, test, eval_every, stop_at, history)
    bar = ProgressBar(range(epochs), desc="epochs", disable=not progress)
    with flush_denormals(flush_denormal):
        for epoch in bar:
            start = time.perf_counter()
            train_loss, train_acc = train_epoch(model, opt, data.train, device, run.after_step)
            history.train_loss.append(train_loss)
            history.train_acc.append(train_acc)
            stop = run.reached()
            shown = run.end_epoch(last=stop or epoch == epochs - 1)
            history.seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{train_loss:.3f}", **shown)
            if callback is not None:
                callback(epoch, history)
            if stop:
                break
    model.train()
    return history
