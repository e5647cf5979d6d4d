"""Fold an eval-mode BatchNorm into the layer before it (or after it), for inference.

In eval mode BN is a fixed per-channel affine map, ``y = scale * z + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``.
When ``z = W x + b`` comes from a conv or linear layer, the two affine maps compose into
one layer with ``W' = scale * W`` (per output channel) and ``b' = scale * (b - mean) + beta``.

- :func:`bn_scale_shift` is that per-channel affine map; every fold below uses it.
- :func:`fold_bn` folds one pair: Conv1d/2d/3d, ConvTranspose1d/2d/3d (any groups) or
  Linear, followed by a torch.nn or bnlab BatchNorm.
- :func:`fold_model` traces a model with ``torch.fx`` and folds every conv/linear -> BN pair;
  :func:`fold_by_name` does the same for pairs named by hand (models fx cannot trace).
- :func:`fold_bn_into_next_conv` folds a BN that comes *before* a conv (exact only
  without zero padding).

How much folding saves is measured in :mod:`bnlab.bench.folding` (``make bench``, notebook 07).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bnlab.nn import modules
from bnlab.nn.hooks import batchnorm_layers
from bnlab.nn.modules import BATCH_NORMS

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE = (*CONVS, *CONV_TRANSPOSES, nn.Linear)


class FusionError(ValueError):
    """A fold that would not compute the same function, with the reason and the remedy."""


# ----------------------------------------------------------------------------- checks


def _validate_bn(bn: nn.Module, name: str = "bn") -> None:
    if not isinstance(bn, BATCH_NORMS):
        raise FusionError(
            f"{name} must be a torch.nn or bnlab BatchNorm1d/2d/3d (got {type(bn).__name__})"
        )
    if bn.training:
        raise FusionError(
            f"{name} is in training mode: it normalizes with batch statistics, which no fixed "
            "weight can reproduce; call model.eval() before folding"
        )
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise FusionError(
            f"{name} has no running statistics (track_running_stats=False): it uses batch "
            "statistics even in eval mode, so it cannot be folded into fixed weights; "
            "keep this BatchNorm, or train with track_running_stats=True"
        )


def _validate_layer(layer: nn.Module, name: str = "layer") -> None:
    if type(layer) not in FOLDABLE:
        kinds = ", ".join(t.__name__ for t in FOLDABLE)
        raise FusionError(f"{name} must be one of {kinds} (got {type(layer).__name__})")
    if layer.training:
        raise FusionError(
            f"{name} is in training mode; folding is for inference: call model.eval() first"
        )


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# ----------------------------------------------------------------------------- algebra


def bn_scale_shift(bn: nn.Module, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as a per-channel affine map ``y = scale * x + shift``.

    Inputs:
    - bn: an eval-mode BatchNorm with running statistics (C channels); affine or not.
    - dtype: precision of the computation (float64 by default, so the fold adds no
      rounding of its own beyond the final cast).

    Returns (scale, shift), each of shape (C,):
    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale,
    with gamma = 1 and beta = 0 when ``affine=False``.
    """
    _validate_bn(bn)
    var = bn.running_var.detach().to(dtype)
    mean = bn.running_mean.detach().to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
    return scale, shift


def _per_row(v: Tensor, rows: int, cols: int, groups: int) -> Tensor:
    """Spread a per-channel vector v (groups * cols,) over a grouped weight's (rows, cols) axes.

    A grouped weight's row r belongs to group r // (rows // groups), and its column c is
    channel (group * cols + c) of v. Returns shape (rows, cols).
    """
    return v.view(groups, 1, cols).expand(groups, rows // groups, cols).reshape(rows, cols)


def _output_scale(layer: nn.Module, scale: Tensor) -> Tensor:
    """``scale`` (C_out,) shaped to multiply ``layer.weight`` along its output channels.

    Conv/Linear weights are (C_out, C_in / groups, *k): output channels are axis 0.
    ConvTranspose weights are (C_in, C_out / groups, *k): output channel
    (group * C_out/groups + j) sits at axis 1 index j of the rows of that group.
    """
    w = layer.weight
    spatial = [1] * (w.dim() - 2)
    if isinstance(layer, CONV_TRANSPOSES):
        per = _per_row(scale, w.shape[0], w.shape[1], layer.groups)
        return per.view(*per.shape, *spatial)
    return scale.view(-1, *([1] * (w.dim() - 1)))


def _like(new: Tensor, old: Tensor) -> nn.Parameter:
    """``new`` cast to old's dtype, device and memory layout (e.g. channels_last)."""
    out = torch.empty_like(old, memory_format=torch.preserve_format)
    out.copy_(new)
    return nn.Parameter(out, requires_grad=old.requires_grad)


def _folded_bias(new: Tensor, layer: nn.Module, c_out: int) -> nn.Parameter:
    """``new`` (C_out,) as the folded layer's bias: like its old bias or, when it had none,
    a new one in the weight's dtype and device that learns when the weight does."""
    if layer.bias is not None:
        return _like(new, layer.bias)
    bias = _like(new, layer.weight.new_empty(c_out))
    return bias.requires_grad_(layer.weight.requires_grad)


def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new layer that computes ``bn(layer(x))`` of an eval-mode pair; inputs are unchanged.

    Inputs:
    - layer: Conv1d/2d/3d or ConvTranspose1d/2d/3d (any groups, stride, padding, dilation,
      with or without bias) or Linear, in eval mode; weight (C_out, ...) or, transposed,
      (C_in, C_out / groups, ...).
    - bn: torch.nn or bnlab BatchNorm over C_out channels, eval mode, with running stats.

    Returns a deep copy of ``layer`` with W' = scale * W (per output channel) and
    b' = scale * b + shift (b = 0 when the layer had none: the copy gains a bias), in the
    layer's dtype, device and memory format. Raises FusionError otherwise.
    """
    _validate_layer(layer)
    _validate_bn(bn)
    c_out = _out_channels(layer)
    if bn.num_features != c_out:
        raise FusionError(
            f"channel mismatch: {type(layer).__name__} has {c_out} output channels but "
            f"{type(bn).__name__} has num_features={bn.num_features}; "
            "fold a BatchNorm only into the layer that produces its input"
        )
    scale, shift = bn_scale_shift(bn)
    weight = layer.weight.detach().to(torch.float64)
    bias = shift if layer.bias is None else scale * layer.bias.detach().to(torch.float64) + shift
    fused = copy.deepcopy(layer)
    fused.weight = _like(weight * _output_scale(layer, scale), layer.weight)
    fused.bias = _folded_bias(bias, layer, c_out)
    return fused


class FoldedLinear(nn.Linear):
    """A Linear with a BatchNorm1d folded in, which refuses input of any rank but 2.

    ``Linear -> BatchNorm1d`` folds exactly only when the Linear's output is (N, F): BN then
    normalizes the Linear's features. On (N, L, F) output BN1d normalizes axis 1, L, and no
    Linear weight can express that. :func:`fold_model` without an example input cannot see
    the rank, so it leaves this guard in place of a silently wrong answer.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise FusionError(
                f"this Linear has a BatchNorm1d folded in, exact only for (N, features) input; "
                f"got input of shape {tuple(x.shape)}: on (N, L, F) BatchNorm1d normalizes "
                "axis 1, not the Linear's features. Keep that BatchNorm unfolded"
            )
        return super().forward(x)


def _guarded(linear: nn.Linear) -> FoldedLinear:
    # skip_init: no random initialization, so folding never moves torch's global RNG
    guard = nn.utils.skip_init(
        FoldedLinear, linear.in_features, linear.out_features, linear.bias is not None
    )
    guard.weight, guard.bias = linear.weight, linear.bias
    return guard


def fold_bn_into_next_conv(
    bn: nn.Module, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, allow_border_error: bool = False
) -> nn.Module:
    """A new conv computing ``conv(bn(x))``: BN *before* the conv, folded into its input side.

    conv(scale * x + shift) = conv'(x) with W'[o, c] = W[o, c] * scale[c] and
    b' = b + sum_{c, k} W[o, c, k] * shift[c]. This is exact only when the conv pads
    nothing with zeros: zero padding of bn(x) is not the zero padding of x (the border
    of conv'(x) misses the shift). Such convs are refused unless ``allow_border_error=True``
    (notebook 07 measures that error).

    Inputs: bn over C_in channels (eval, running stats); conv (C_out, C_in / groups, *k), eval.
    Returns a deep copy of conv with the folded weight and bias.
    """
    _validate_bn(bn)
    if type(conv) not in CONVS:
        raise FusionError(f"conv must be Conv1d/2d/3d (got {type(conv).__name__})")
    _validate_layer(conv, "conv")
    if bn.num_features != conv.in_channels:
        raise FusionError(
            f"channel mismatch: BatchNorm has num_features={bn.num_features} but the conv "
            f"takes in_channels={conv.in_channels}"
        )
    pads = conv.padding != "valid" and (
        isinstance(conv.padding, str) or any(p != 0 for p in conv.padding)
    )
    if pads and conv.padding_mode == "zeros" and not allow_border_error:
        raise FusionError(
            f"conv pads with zeros (padding={conv.padding!r}): a BatchNorm before it cannot be "
            "folded exactly, since padding bn(x) with zeros differs from padding x with zeros; "
            "fold it only into convs with padding=0 (or padding_mode='reflect'/'replicate'), "
            "or pass allow_border_error=True to accept wrong values at the border"
        )
    scale, shift = bn_scale_shift(bn)
    w = conv.weight.detach().to(torch.float64)
    c_out, c_in_per_group = w.shape[:2]
    spatial = [1] * (w.dim() - 2)
    scale_w = _per_row(scale, c_out, c_in_per_group, conv.groups).view(c_out, -1, *spatial)
    shift_w = _per_row(shift, c_out, c_in_per_group, conv.groups).view(c_out, -1, *spatial)
    bias = (w * shift_w).flatten(1).sum(1)
    if conv.bias is not None:
        bias = bias + conv.bias.detach().to(torch.float64)
    fused = copy.deepcopy(conv)
    fused.weight = _like(w * scale_w, conv.weight)
    fused.bias = _folded_bias(bias, conv, c_out)
    return fused


# ----------------------------------------------------------------------------- whole models


class _Tracer(fx.Tracer):
    """fx tracer that keeps bnlab's BatchNorm modules as leaves (like torch.nn's)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, modules._BatchNorm) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` symbolic trace of ``model`` with torch.nn and bnlab BatchNorms as leaves.

    Raises FusionError with a hint when the model cannot be traced (data-dependent control
    flow, for instance).
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise FusionError(
            f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}). "
            "Fold module pairs by name instead: bnlab.fusion.fold_by_name(model, "
            "[('features.0', 'features.1'), ...])"
        ) from err
    return fx.GraphModule(model, graph, type(model).__name__)


def foldable_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(layer node, BN node) pairs of a traced model whose fold is exact.

    A pair qualifies when a BN module is called directly on the output of a
    conv/transposed conv/linear module and that output has no other user (else the other
    user would see the folded, normalized values). Raises FusionError when the layer
    module is called at more than one place: folding would change every call.
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), BATCH_NORMS):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module":
            continue
        if type(gm.get_submodule(prev.target)) not in FOLDABLE or len(prev.users) > 1:
            continue
        if calls[prev.target] > 1:
            raise FusionError(
                f"'{prev.target}' is a conv used twice (called at {calls[prev.target]} places); "
                f"folding '{node.target}' into it would change the other calls: give each call "
                "its own module (copy.deepcopy) before folding"
            )
        pairs.append((prev, node))
    return pairs


def _fold_pair(gm: fx.GraphModule, layer_node: fx.Node, bn_node: fx.Node) -> nn.Module:
    """The folded layer for one traced pair, or FusionError when the shapes forbid it."""
    layer = gm.get_submodule(layer_node.target)
    try:
        fused = fold_bn(layer, gm.get_submodule(bn_node.target))
    except FusionError as err:
        raise FusionError(f"'{layer_node.target}' -> '{bn_node.target}': {err}") from err
    if not isinstance(layer, nn.Linear):
        return fused  # a conv's output channels are axis 1, as BN's are
    meta = layer_node.meta.get("tensor_meta")
    if meta is None:  # no example input: the rank shows only at call time
        return _guarded(fused)
    if len(meta.shape) != 2:
        raise FusionError(
            f"'{layer_node.target}' (Linear) -> '{bn_node.target}' "
            f"({type(gm.get_submodule(bn_node.target)).__name__}): the Linear's output has shape "
            f"{tuple(meta.shape)}, so the BatchNorm normalizes axis 1, not the Linear's "
            "features, and no folded weight computes it. Keep this BatchNorm (fold the other "
            "pairs with bnlab.fusion.fold_by_name)"
        )
    return fused


def fold_model(model: nn.Module, *example_inputs: Tensor) -> fx.GraphModule:
    """A traced copy of ``model`` with every foldable conv/linear -> BN pair folded.

    Inputs: model in eval mode (torch.nn or bnlab BatchNorms); optionally example inputs,
    whose traced shapes decide each Linear -> BatchNorm1d pair at fold time (exact only on
    (N, F) output). Without them such a pair becomes a :class:`FoldedLinear`, which refuses
    other ranks when called. The model is not changed.
    Returns an fx.GraphModule computing the same function, in which each folded BN is
    gone (graph node and submodule). Raises FusionError if the model is in training mode,
    cannot be traced (with a hint), or a fold is refused (see :func:`fold_bn`), naming the
    module path and why.
    """
    if model.training:
        raise FusionError(
            "model is in training mode; folding uses the running statistics of eval mode: "
            "call model.eval() first"
        )
    gm = trace(copy.deepcopy(model))
    if example_inputs:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    for layer_node, bn_node in foldable_pairs(gm):
        gm.set_submodule(layer_node.target, _fold_pair(gm, layer_node, bn_node))
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fold_by_name(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """A copy of ``model`` with each named (layer, bn) pair folded and the BN made Identity.

    For models fx cannot trace. You vouch that each BN is applied only to its layer's
    output, that nothing else reads that output, and that the layer is called once.
    Inputs: model in eval mode; pairs of qualified names, e.g. [("conv1", "bn1")].
    """
    if model.training:
        raise FusionError("model is in training mode: call model.eval() before folding")
    out = copy.deepcopy(model)
    for layer_name, bn_name in pairs:
        layer, bn = out.get_submodule(layer_name), out.get_submodule(bn_name)
        out.set_submodule(layer_name, fold_bn(layer, bn))
        out.set_submodule(bn_name, nn.Identity())
    return out


# ----------------------------------------------------------------------------- comparisons


def max_difference(ref: Tensor, out: Tensor) -> tuple[float, float]:
    """(max |out - ref|, max |out - ref| / max |ref|) of two same-shape outputs."""
    diff = (out.double() - ref.double()).abs().max().item()
    return diff, diff / max(ref.double().abs().max().item(), 1e-300)


def fold_errors(
    model: nn.Module, x: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
) -> dict[torch.dtype, tuple[float, float]]:
    """How far ``fold_model(model)`` is from ``model`` on ``x``, computed in each dtype.

    Each dtype gets its own eval-mode copy of the model and of ``x``; the model is not
    changed. Returns {dtype: (max abs difference, max relative difference)}.
    """
    errors = {}
    for dtype in dtypes:
        copy_ = copy.deepcopy(model).to(dtype).eval()
        with torch.no_grad():
            errors[dtype] = max_difference(copy_(x.to(dtype)), fold_model(copy_)(x.to(dtype)))
    return errors


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN in ``model`` non-trivial running stats and affine parameters, in place.

    Fresh BNs have mean 0, var 1, gamma 1, beta 0, which makes folding look easy;
    this draws mean ~ N(0, 0.5), var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in batchnorm_layers(model):
            if m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                if m.bias is not None:  # BatchNorm(..., bias=False) scales without shifting
                    m.bias.copy_(0.5 * torch.randn(c, generator=gen))
    return model
