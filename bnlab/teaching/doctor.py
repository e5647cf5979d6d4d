"""A pitfall detector: scan a model (and optionally a data loader) for BatchNorm mistakes.

Static checks walk the leaf modules in ``named_modules`` order, which is execution
order for ``nn.Sequential`` models:

- ``bn-after-dropout``: BN after Dropout (directly, or with one Linear/Conv between,
  which carries the shift through) sees a variance at training time that it never
  sees at inference (Li et al. 2019, "Understanding the Disharmony between
  Dropout and Batch Normalization by Variance Shift", arXiv:1801.05134);
- ``bias-before-bn``: a Conv/Linear bias right before BN is subtracted away with the
  batch mean (Ioffe & Szegedy 2015, arXiv:1502.03167, section 3.2);
- ``track-running-stats-mismatch``: ``track_running_stats`` was switched off after
  construction, but the buffers still exist and eval mode still uses them;
- ``non-finite-running-stats``: a running mean or variance holds NaN or inf. One training
  batch with a NaN or inf that reaches a BN layer puts it in the batch statistics, and the
  momentum update keeps it in the running ones for good (torch does the same, silently):
  every eval-mode output of those channels is NaN from then on.

Dynamic checks (with a loader) hook every BN layer during a pass over a few batches,
then restore every buffer, so the scan changes nothing:

- ``bn-train-in-eval`` (phase="eval"): a BN layer ran in training mode while evaluating;
- ``single-value-per-channel`` (phase="train"): a BN layer in training mode got one
  value per channel, which torch rejects; also predicted from the loader's size when
  its last batch would hold a single example;
- ``non-finite-input``: NaN or inf reached a BN layer in training mode: the first such
  layer and batch, and every layer whose running statistics that batch poisoned.

:func:`watch` makes the last check during real training (a ``with`` block around the
loop): it names the batch where non-finite values first reached a BN layer.

Serves notebook 06.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnlab.nn import hooks
from bnlab.nn.modules import is_batchnorm

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PitfallWarning(UserWarning):
    """Warning category of every finding that ``warn`` reports."""


@dataclass(frozen=True)
class Finding:
    """One likely pitfall: a short code, the module it concerns, and a message with the fix."""

    code: str
    layer: str
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.layer}: {self.message}"


def static_findings(model: nn.Module) -> list[Finding]:
    """Findings from the model's structure alone (no data): see the module docstring."""
    findings = []
    previous: tuple[str, nn.Module] | None = None
    before_previous: tuple[str, nn.Module] | None = None
    for name, m in hooks.leaves(model):
        if is_batchnorm(m) and previous is not None:
            prev_name, prev = previous
            dropout = None
            if isinstance(prev, _DROPOUT):
                dropout, drop_name, where = prev, prev_name, "directly after"
            elif isinstance(prev, _LINEAR) and before_previous is not None:
                if isinstance(before_previous[1], _DROPOUT):
                    drop_name, dropout = before_previous
                    where = f"after {prev_name!r} after"
            if dropout is not None:
                findings.append(
                    Finding(
                        "bn-after-dropout",
                        name,
                        f"BatchNorm {where} {type(dropout).__name__} ({drop_name!r}): its "
                        "running variance is learned with dropout on and used with dropout "
                        "off (variance shift, Li et al. 2019). Move Dropout after the last "
                        "BN layer, or re-estimate the statistics with dropout off "
                        "(bnlab.recalibrate.recalibrate_bn).",
                    )
                )
            if isinstance(prev, _LINEAR) and prev.bias is not None:
                shift = (
                    "BN's beta already provides a learned shift"
                    if m.affine
                    else "the shift is lost entirely"
                )
                findings.append(
                    Finding(
                        "bias-before-bn",
                        prev_name,
                        f"{type(prev).__name__} has a bias but feeds BatchNorm {name!r}, which "
                        f"subtracts the batch mean and with it the bias; {shift}. Build it "
                        "with bias=False (a wasted parameter per channel).",
                    )
                )
        if is_batchnorm(m) and not m.track_running_stats and m.running_mean is not None:
            findings.append(
                Finding(
                    "track-running-stats-mismatch",
                    name,
                    "track_running_stats is False but the running buffers exist (it was set "
                    "after construction): training no longer updates them, yet eval() still "
                    "normalizes with them. Build the layer with track_running_stats=False, "
                    "or set running_mean and running_var to None as well.",
                )
            )
        if is_batchnorm(m):
            findings += _poisoned_statistics(name, m)
        before_previous, previous = previous, (name, m)
    return findings


def _channels(bad: Tensor) -> str:
    """``[0, 3, 4]`` (at most eight, then ``...``) of a (C,) mask."""
    index = bad.nonzero().flatten().tolist()
    return str(index[:8])[:-1] + (", ...]" if len(index) > 8 else "]")


def _poisoned_statistics(name: str, bn: nn.Module) -> list[Finding]:
    """``non-finite-running-stats`` for one BN layer whose running statistics are not finite."""
    stats = {k: getattr(bn, k, None) for k in ("running_mean", "running_var")}
    bad = {k: ~torch.isfinite(v) for k, v in stats.items() if v is not None}
    if not any(mask.any() for mask in bad.values()):
        return []
    channels = torch.stack(list(bad.values())).any(0)
    what = "; ".join(
        f"{k} has NaN or inf in channels {_channels(mask)}" for k, mask in bad.items() if mask.any()
    )
    return [
        Finding(
            "non-finite-running-stats",
            name,
            f"running statistics are not finite in {int(channels.sum())} of {channels.numel()} "
            f"channels ({what}): a NaN or inf reached this layer in a training batch, and "
            "every eval-mode output of these channels is NaN now. Find the batch with "
            "bnlab.teaching.doctor.watch(model) around the training loop, then re-estimate the "
            "statistics on clean data (bnlab.recalibrate.recalibrate_bn) or reload a "
            "checkpoint from before it.",
        )
    ]


def _loader_last_batch(loader) -> int | None:
    """Size of the loader's last batch when it can be read off the loader, else None."""
    batch_size = getattr(loader, "batch_size", None)
    if not batch_size or getattr(loader, "drop_last", False):
        return None
    if hasattr(loader, "dataset"):
        n = len(loader.dataset)
    elif hasattr(loader, "x"):
        n = len(loader.x)
    else:
        return None
    rest = n % batch_size
    return rest if rest else batch_size


class _OneValue(Exception):
    """Raised inside a hook to stop the pass before torch's own error."""


def _train_mode_findings(name: str, x: Tensor, phase: str) -> dict[tuple[str, str], Finding]:
    """What a BN layer in training mode reveals, given its input ``x``."""
    found = {}
    if phase == "eval":
        found[("bn-train-in-eval", name)] = Finding(
            "bn-train-in-eval",
            name,
            "BatchNorm ran in training mode during evaluation: predictions depend on the "
            "other examples in the batch and the running statistics are overwritten by "
            "evaluation data. Call model.eval() before evaluating (torch.no_grad() "
            "does not switch modes).",
        )
    if x.dim() >= 2 and x.shape[1] and x.numel() // x.shape[1] == 1:
        found[("single-value-per-channel", name)] = Finding(
            "single-value-per-channel",
            name,
            f"BatchNorm in training mode got input of shape {tuple(x.shape)}: one value per "
            "channel, so the batch variance is 0 and torch raises. Use batches of at "
            "least 2 (drop_last=True drops a last batch of 1), or eval mode.",
        )
    return found


def _last_batch_finding(loader) -> Finding:
    which = "every batch" if loader.batch_size == 1 else "the last batch"
    return Finding(
        "single-value-per-channel",
        "loader",
        f"{which} of the loader holds a single example: BatchNorm1d (or BN after "
        "global pooling) raises in training mode. Pass drop_last=True, or choose a "
        "batch size of at least 2 that does not leave a remainder of 1.",
    )


class _NonFinite:
    """Per batch, the BN layers in training mode whose input held NaN or inf (in call order).

    ``hook`` is a forward pre-hook for BN layers; :meth:`finding` reports the first layer of
    a batch, with every layer whose running statistics the batch poisoned.
    """

    def __init__(self, names: dict[nn.Module, str]) -> None:
        self.names, self.layers, self.first = names, [], None

    def hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if module.training and not bool(torch.isfinite(x).all()):
            if not self.layers:
                nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
                self.first = (tuple(x.shape), nan, inf, x.numel())
            self.layers.append(self.names[module])

    def finding(self, batch: int) -> Finding | None:
        """The finding of the batch just run (None if its values stayed finite); resets."""
        layers, self.layers = self.layers, []
        if not layers:
            return None
        shape, nan, inf, total = self.first
        poisoned = ", ".join(repr(n) for n in layers)
        return Finding(
            "non-finite-input",
            layers[0],
            f"batch {batch} (counting from 0) reached this BatchNorm in training mode with "
            f"{nan} NaN and {inf} inf among the {total} values of its input {shape}: its batch "
            "mean and variance are not finite, and the momentum update carries them into the "
            f"running statistics of {poisoned} for good (torch does the same, silently). "
            "Find where they come from (the data: torch.isfinite(x).all(); a diverging run: "
            "the loss before this batch), then re-estimate the statistics on clean data "
            "(bnlab.recalibrate.recalibrate_bn) or reload a checkpoint.",
        )


@contextmanager
def watch(model: nn.Module) -> Iterator[list[Finding]]:
    """Watch a training run: the list fills with a ``non-finite-input`` finding when NaN or
    inf first reach a BN layer in training mode (which layer, which batch, what it poisoned).

    Use it around the training loop: ``with watch(model) as found: ...``. Only the first such
    batch is reported: after it, NaN in the weights or the statistics carries on by itself.
    Each forward call of ``model`` counts as one batch; the hooks go when the block ends.
    """
    found: list[Finding] = []
    tracker = _NonFinite({m: n for n, m in hooks.batchnorm_layers(model)})
    batches = itertools.count()

    def after_forward(_module: nn.Module, _args: tuple, _out) -> None:
        finding = tracker.finding(next(batches))
        if finding is not None and not found:
            found.append(finding)

    with hooks.hooked(tracker.names, tracker.hook), hooks.hooked([model], after_forward, False):
        yield found


def dynamic_findings(
    model: nn.Module, loader: Iterable, phase: str = "eval", max_batches: int = 2
) -> list[Finding]:
    """Findings from a pass over ``max_batches`` batches of ``loader`` with the model as it is.

    phase: "eval" if the loader is used for evaluation, "train" if for training.
    Running statistics and num_batches_tracked are restored afterwards, and no gradient
    is computed, so the model is unchanged.
    """
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train' (got {phase!r})")
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (got {max_batches})")
    layers = hooks.batchnorm_layers(model)
    findings: dict[tuple[str, str], Finding] = {}
    names = {m: n for n, m in layers}
    non_finite = _NonFinite(names)

    def hook(module: nn.Module, args: tuple) -> None:
        if module.training:
            found = _train_mode_findings(names[module], args[0], phase)
            findings.update(found)
            if any(code == "single-value-per-channel" for code, _ in found):
                raise _OneValue
            non_finite.hook(module, args)

    with torch.no_grad(), hooks.preserved(model, buffers=True), hooks.hooked(names, hook):
        for index, batch in enumerate(itertools.islice(loader, max_batches)):
            try:
                model(batch[0] if isinstance(batch, (list, tuple)) else batch)
            except _OneValue:
                pass
            found = non_finite.finding(index)
            if found is not None:
                findings.setdefault((found.code, found.layer), found)  # the first batch
    result = list(findings.values())
    bn_trains = any(m.training for _, m in layers)
    if phase == "train" and bn_trains and _loader_last_batch(loader) == 1:
        result.append(_last_batch_finding(loader))
    return result


def diagnose(
    model: nn.Module, loader: Iterable | None = None, phase: str = "eval", max_batches: int = 2
) -> list[Finding]:
    """All findings for ``model`` (static) and, given a ``loader``, for a pass over it."""
    findings = static_findings(model)
    if loader is not None:
        findings += dynamic_findings(model, loader, phase, max_batches)
    return findings


def warn(
    model: nn.Module, loader: Iterable | None = None, phase: str = "eval", max_batches: int = 2
) -> list[Finding]:
    """``diagnose``, and emit each finding as a ``PitfallWarning``; returns the findings."""
    findings = diagnose(model, loader, phase, max_batches)
    for f in findings:
        warnings.warn(str(f), PitfallWarning, stacklevel=2)
    return findings
