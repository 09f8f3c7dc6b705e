"""Our own differentiation rules for convolutions, for gradient graphs that will be differentiated
a second time (``create_graph=True``, then ``H v``).

Why: PyTorch's generic double-backward formula for a convolution computes the weight-gradient part
as a convolution of the transposed input with the transposed output gradient (a kernel as large as
the feature map), which is slow on the CPU. Here the first backward of ``conv(x, W)`` is written as
two bilinear functions of the output gradient ``g`` (``dx = A(g, W)``, ``dW = B(g, x)``), each with
its own backward made of the kernels training itself uses (a forward convolution and one output of
``convolution_backward``). The values and both derivatives are the same functions, so the HVP is
the same up to rounding (tests: dense fp64 Hessians to 1e-10, ResNet-18 in fp32 to 1e-5). Measured
(``benchmarks/bench_hvp.py``, CPU, ResNet-18, 128 images): see the README. (Eval-mode BatchNorm
written as its affine map was faster too, but kept 10 % more memory at the peak; not used.)

Used only while :mod:`scaling_abs.curvature` builds and differentiates a gradient graph
(:func:`second_order_rules`): the model's ``nn.Conv1d/2d/3d`` modules are redirected; anything else
(non-zero padding modes, string padding, unbatched inputs, functional calls, transposed
convolutions, other layers) runs PyTorch's own rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_backward(g, x, w, conf, which: int) -> torch.Tensor:
    """One output of ``aten.convolution_backward`` (0: the input's gradient, 1: the weight's)."""
    stride, padding, dilation, groups = conf
    mask = [which == 0, which == 1, False]
    zeros = [0] * len(stride)
    out = torch.ops.aten.convolution_backward(
        g, x, w, None, stride, padding, dilation, False, zeros, groups, mask
    )
    return out[which]


class _InputGrad(Function):
    """``dL/dx`` of ``conv(x, W)`` for output gradient ``g``: linear in ``g`` and in ``W``."""

    @staticmethod
    def forward(ctx, g, x, w, conf):
        ctx.save_for_backward(g, x, w)
        ctx.conf = conf
        return _conv_backward(g, x, w, conf, 0)

    @staticmethod
    def backward(ctx, gg):
        g, x, w = ctx.saved_tensors
        d_g = d_w = None
        if ctx.needs_input_grad[0]:
            d_g = _FORWARD[len(ctx.conf[0])](gg, w, None, *ctx.conf)
        if ctx.needs_input_grad[2]:
            d_w = _conv_backward(g, gg, w, ctx.conf, 1)
        return d_g, None, d_w, None


class _WeightGrad(Function):
    """``dL/dW`` of ``conv(x, W)`` for output gradient ``g``: linear in ``g`` and in ``x``."""

    @staticmethod
    def forward(ctx, g, x, w, conf):
        ctx.save_for_backward(g, x, w)
        ctx.conf = conf
        return _conv_backward(g, x, w, conf, 1)

    @staticmethod
    def backward(ctx, gg):
        g, x, _ = ctx.saved_tensors
        d_g = d_x = None
        if ctx.needs_input_grad[0]:
            d_g = _FORWARD[len(ctx.conf[0])](x, gg, None, *ctx.conf)
        if ctx.needs_input_grad[1]:
            d_x = _conv_backward(g, x, gg, ctx.conf, 0)
        return d_g, d_x, None, None


class _Conv(Function):
    """``conv(x, W) + b`` whose backward is made of :class:`_InputGrad` and :class:`_WeightGrad`,
    so that differentiating it again runs training's kernels."""

    @staticmethod
    def forward(ctx, x, w, b, conf):
        ctx.save_for_backward(x, w)
        ctx.conf, ctx.has_bias = conf, b is not None
        return _FORWARD[len(conf[0])](x, w, b, *conf)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        d_x = _InputGrad.apply(g, x, w, ctx.conf) if ctx.needs_input_grad[0] else None
        d_w = _WeightGrad.apply(g, x, w, ctx.conf) if ctx.needs_input_grad[1] else None
        d_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_b = g.sum([0, *range(2, g.dim())])
        return d_x, d_w, d_b, None


def _conv(x, w, b, conf):
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast here, so the saved tensors match the gradients
        dtype = torch.get_autocast_dtype(device)
        x, w = x.to(dtype), w.to(dtype)
        b = None if b is None else b.to(dtype)
    return _Conv.apply(x, w, b, conf)


def _rule_forward(module: nn.Module) -> Callable | None:
    """A forward for ``module`` that builds its graph with the rules above, falling back to the
    module's own forward where they do not apply; None for modules they never apply to."""
    original = module.forward
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        n = len(module.kernel_size)
        conf = (module.stride, module.padding, module.dilation, module.groups)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None

        def conv_forward(x):
            if x.dim() != n + 2:  # unbatched input
                return original(x)
            return _conv(x, module.weight, module.bias, conf)

        return conv_forward
    return None


def wanted(setting: bool | str, device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """``setting`` resolved: ``"auto"`` means on the CPU without autocast (where it was measured
    faster); other devices and autocast keep PyTorch's rules until measured there."""
    if not (setting is True or setting is False or setting == "auto"):  # 1 == True: not allowed
        raise ValueError(f"custom_rules must be True, False or 'auto', got {setting!r}")
    if setting == "auto":
        return device.type == "cpu" and autocast_dtype is None
    return bool(setting)


@contextlib.contextmanager
def second_order_rules(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: ``model``'s ``nn.Conv1d/2d/3d`` modules build their graphs with
    the rules above (an instance-level ``forward``, removed on exit). Module-level rather than a
    ``TorchFunctionMode``: non-reentrant activation checkpointing recomputes the forward during the
    backward, outside any mode, and the recomputation must save the same tensors as the forward.
    Nested uses are harmless (a module that already has its own ``forward`` is left alone)."""
    swapped = []
    try:
        for module in model.modules() if enabled else ():
            if "forward" in module.__dict__:  # swapped by an outer use, or the user's own
                continue
            forward = _rule_forward(module)
            if forward is not None:
                module.forward = forward
                swapped.append(module)
        yield
    finally:
        for module in swapped:
            del module.forward
