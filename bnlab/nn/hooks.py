"""Walking a model's layers and hooking their forward calls: the one place bnlab does either.

Many lessons need to look inside a network while it runs: which layers are BatchNorms,
what a layer received or returned, what its running statistics were before a pass.
Every bnlab tool that does so goes through this module, so there is one answer to "how do
I find the BN layers", "how do I see a layer's input" and "how do I leave the model as I
found it":

- :func:`layers`, :func:`batchnorm_layers`, :func:`leaves`: (qualified name, module) pairs
  in ``named_modules`` order, which is execution order for ``nn.Sequential`` models;
- :func:`replace_modules`: swap matching submodules in place (BN -> FrozenBN, GroupNorm, ...);
- :func:`attach`: a forward (pre-)hook that stays until its handle is removed;
- :func:`hooked`: forward (pre-)hooks attached for the duration of a ``with`` block only;
- :func:`recording`: what chosen layers received or returned, call by call;
- :func:`preserved`: every module's train/eval flag, and optionally every BN buffer,
  restored when the block ends, however it ends.

Serves notebooks 01 and 08 (activation probes), 06 (freeze, recalibrate, doctor),
07 (fusion).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.nn.modules import is_batchnorm

Kinds = type[nn.Module] | tuple[type[nn.Module], ...]


def layers(model: nn.Module, kinds: Kinds) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) for every submodule of type ``kinds``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) for every BatchNorm layer in ``model`` (torch.nn's or bnlab's)."""
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module with no children; a BatchNorm always counts as one."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if is_batchnorm(m) or next(m.children(), None) is None
    ]


def replace_modules(
    model: nn.Module,
    predicate: Callable[[nn.Module], bool],
    factory: Callable[[nn.Module], nn.Module],
) -> nn.Module:
    """Replace, in place, every submodule for which ``predicate`` holds by ``factory(old)``.

    Used to swap BatchNorm for FrozenBatchNorm2d or for GroupNorm, or to wrap it. A
    replaced module's children are not visited. Returns ``model``; the root itself is
    never replaced.
    """
    for name, child in list(model.named_children()):
        if predicate(child):
            setattr(model, name, factory(child))
        else:
            replace_modules(child, predicate, factory)
    return model


def _named(modules: Mapping[str, nn.Module] | Iterable) -> list[tuple[str, nn.Module]]:
    if isinstance(modules, Mapping):
        return list(modules.items())
    pairs = list(modules)
    if pairs and isinstance(pairs[0], nn.Module):
        return [(str(i), m) for i, m in enumerate(pairs)]
    return pairs


def attach(module: nn.Module, hook: Callable, pre: bool = True) -> RemovableHandle:
    """Attach ``hook`` to ``module`` until the returned handle's ``remove()`` is called.

    pre=True: a forward pre-hook, ``hook(module, args)``, which runs before the forward and
    sees its input; pre=False: a forward hook, ``hook(module, args, output)``.
    """
    return module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)


@contextmanager
def hooked(
    modules: Iterable[nn.Module], hook: Callable, pre: bool = True
) -> Iterator[list[RemovableHandle]]:
    """Attach ``hook`` (see :func:`attach`) to every module for the ``with`` block only.

    The handles are removed even when the block raises.
    """
    handles = [attach(m, hook, pre) for m in modules]
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recording(
    modules: Mapping[str, nn.Module] | Iterable, what: str = "output"
) -> Iterator[dict[str, list[Tensor]]]:
    """Record, for each named module, what it received or returned at every call in the block.

    modules: {name: module}, (name, module) pairs (as :func:`layers` returns), or modules
        (named "0", "1", ...).
    what: "input" (the first positional argument) or "output".
    Yields {name: [tensor per call]}; tensors are detached, not copied.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output' (got {what!r})")
    named = _named(modules)
    if not named:
        raise ValueError("recording needs at least one module to watch")
    seen: dict[str, list[Tensor]] = {name: [] for name, _ in named}
    names = {m: name for name, m in named}

    def record(module: nn.Module, args: tuple, output: Tensor | None = None) -> None:
        value = args[0] if what == "input" else output
        seen[names[module]].append(value.detach())

    with hooked(names, record, pre=what == "input"):
        yield seen


@contextmanager
def preserved(model: nn.Module, buffers: bool = False) -> Iterator[nn.Module]:
    """Restore every module's train/eval flag (and, with ``buffers``, every BN buffer) on exit.

    For passes that must leave the model as it was: a probe that switches BN layers to
    training mode, or a diagnostic pass whose training-mode forwards update running
    statistics and ``num_batches_tracked``.
    """
    modes = {m: m.training for m in model.modules()}
    saved = {}
    if buffers:
        saved = {
            bn: {k: v.clone() for k, v in bn.named_buffers(recurse=False)}
            for _, bn in batchnorm_layers(model)
        }
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for bn, values in saved.items():
                for key, value in values.items():
                    getattr(bn, key).copy_(value)
