"""Our own differentiation rules for convolutions, eval-mode BatchNorm, ReLU and max pooling, for
gradient graphs that will be differentiated a second time (``create_graph=True``, then ``H v``).

Why: PyTorch's generic double-backward formula for a convolution computes the weight-gradient part
as a convolution of the transposed input with the transposed output gradient (a kernel as large as
the feature map), and eval-mode BatchNorm goes through ``batchnorm_double_backward``'s general
(batch-statistics) formula; on the CPU both are slow (the latter took 41 % of a product of the
small CNN: ``benchmarks/profile_hvp.py --model cnn --batch 512``). Here the first backward of ``conv(x, W)`` is written as two bilinear functions of the output
gradient ``g`` (``dx = A(g, W)``, ``dW = B(g, x)``), each with its own backward made of the kernels
training itself uses (a forward convolution and one output of ``convolution_backward``), and
eval-mode BatchNorm is the per-channel affine map it is, ``x * s + t`` with
``s = w / sqrt(var + eps)``, ``t = b - mean * s`` (written as a multiply and an add: ``addcmul``'s
backward keeps a full-size copy of ``x`` in a second-order graph); on the CPU and CUDA in fp32 or
fp64 (:data:`FOLD_DEVICES`), where it reads a convolution's untouched output, it is folded into that
convolution instead (``conv(x, W * s) + t``: the scale on the small weight, not on the feature map;
:func:`_folded`), and 2-d convolutions run in the channels-last memory format there
(:func:`_channels_last`, :data:`LAYOUT_DEVICES`; ReLU, BatchNorm and our max pooling keep it). The
values and both derivatives are the same functions, so the HVP is the same up to rounding (tests: dense fp64 Hessians to 1e-10,
ResNet-18 in fp32 to 1e-5). ReLU and max pooling are piecewise linear, so their backward's
derivative in the forward input is zero; PyTorch's rules build it as a zeros tensor of the input's
size and carry it back through the forward graph below (a profile of the small CNN's product at 512
images showed 12 ms of such fills in 102 ms); ours leave it out. The gain measured small: the small
CNN's 10-product estimate 0.94x, its single product and ResNet-18's unchanged (benchmarks/README.md).
Measured (``benchmarks/bench_hvp.py``): see benchmarks/README.md.

Used only while :mod:`scaling_abs.curvature` builds and differentiates a gradient graph
(:func:`second_order_rules`): the model's ``nn.Conv1d/2d/3d``, ``nn.BatchNorm*``, ``nn.ReLU`` and
``nn.MaxPool2d`` modules are redirected; anything else (non-zero padding modes, string padding,
unbatched inputs, BatchNorm with batch statistics, pooling that returns its indices, functional
calls, transposed convolutions, other layers) runs PyTorch's own rules.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# Modules under the rules right now: a copy made during a check carries the bound methods along
# (rebound to itself by deepcopy) but is not in here, so it keeps PyTorch's rules.
_ACTIVE: weakref.WeakSet = weakref.WeakSet()


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


def _autocast_cast(t: torch.Tensor | None, device: str) -> torch.Tensor | None:
    """What autocast does to a convolution's argument: floating tensors other than fp64 go to its
    dtype (cast here, so the saved tensors match the gradients' dtype)."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(torch.get_autocast_dtype(device))


# A convolution's output carries (input, weight, bias, conf, versions) under this attribute, so that
# an eval-mode BatchNorm applied to it can fold itself into the convolution (:func:`_folded`).
_FOLDABLE = "_scaling_abs_conv"

# Devices where, in fp32 and fp64, our convolutions fold the eval-mode BatchNorm after them
# (:func:`_folded`) and run 2-d convolutions channels-last (:func:`_channels_last`). Both measured
# faster on the CPU and, for ResNet-18 from 512 images, on CUDA: a 10-product estimate 0.77x at 512
# images (H200) and 0.66x at 1,024 (H100); at 128-256 images and on the small CNN within the runs'
# spread (benchmarks/README.md, "Folding and channels-last on CUDA too"). ``benchmarks/bench_rules_ab.py`` sets them to measure either way.
FOLD_DEVICES: tuple[str, ...] = ("cpu", "cuda")
LAYOUT_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def _channels_last(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-d convolution's input and weight in the channels-last memory format, where the CPU's
    and cuDNN's convolution kernels measured faster in a second-order graph. Copies where they are
    not in it already: the small weight at every call, the input once, since the layers after keep
    the layout. ResNet-18 at 128 images on the CPU: a kept-graph product 0.91x, a 10-product
    estimate 0.88x of the NCHW one; the small CNN's product from scratch 0.89x, on a kept graph
    unchanged (benchmarks/README.md, "Channels-last convolutions"); at 1,024 images on an H100 the folded
    estimate 0.79x (benchmarks/README.md, "Folding and channels-last on CUDA too")."""
    return _nhwc(x), _nhwc(w)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` (4-d) with channels-last strides. A tensor with one channel (or a 1x1 plane) is
    contiguous in both formats, and the CPU's kernels then read its NCHW strides as NCHW: the small
    CNN's first convolution (one input channel, 512 images) took 15.5 ms that way against 1.2-1.7 ms with
    channels-last strides. Such a tensor is copied into explicit channels-last strides (the same
    memory order: for one channel, a copy of the same bytes)."""
    n, c, h, w = t.shape
    strides = (h * w * c, 1, w * c, c)
    if t.is_contiguous(memory_format=torch.channels_last) and t.stride() != strides:
        return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)
    return t.contiguous(memory_format=torch.channels_last)


def _conv(x, w, b, conf):
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x, w, b = (_autocast_cast(t, device) for t in (x, w, b))
    elif device in LAYOUT_DEVICES and x.dim() == 4 and x.dtype in (torch.float32, torch.float64):
        x, w = _channels_last(x, w)
    out = _Conv.apply(x, w, b, conf)
    if device in FOLD_DEVICES and out.dtype in (torch.float32, torch.float64):
        setattr(out, _FOLDABLE, (x, w, b, conf, _versions(out, x, w, b)))
    return out


def _versions(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else t._version for t in tensors)


def _folded(conv_out: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
    """``conv(x, W * s) + (b * s + t)``, the same function as ``conv(x, W, b) * s + t`` (eval-mode
    BatchNorm after a convolution), or None when ``conv_out`` is not a convolution's untouched output.
    The per-channel scale then sits on the small weight instead of multiplying the feature map: the
    second-order graph of ``x * s`` costs several full-size multiplies per product (the small CNN's
    two BatchNorms were half of its product on the CPU; benchmarks/README.md, "What a curvature check costs").
    The convolution's own output is computed anyway (other code may use it) and dropped here."""
    saved = getattr(conv_out, _FOLDABLE, None)
    if saved is None:
        return None
    x, w, b, conf, versions = saved
    # the output, or the convolution's input, weight or bias changed in place since; mixed dtypes
    if _versions(conv_out, x, w, b) != versions or scale.dtype != w.dtype:
        return None
    w = w * scale.view((-1,) + (1,) * (w.dim() - 1))
    b = shift if b is None else b * scale + shift
    return _Conv.apply(x, w, b, conf)


def _eval_batch_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module._check_input_dim(x)
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    folded = _folded(x, scale, shift)
    if folded is not None:
        return folded
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = x * scale.view(shape) + shift.view(shape)
    return out if out.dtype == x.dtype else out.to(x.dtype)  # autocast: BatchNorm keeps its input's


class _ReluGrad(Function):
    """``g * (y > 0)`` for ReLU's output ``y``: linear in ``g``. Its derivative in ``y`` is zero
    (ReLU is piecewise linear); PyTorch's rule builds it as a full-size zeros tensor and sends it back
    through the whole forward graph below, which is None here."""

    @staticmethod
    def forward(ctx, g, y):
        ctx.save_for_backward(y)
        return torch.ops.aten.threshold_backward(g, y, 0)

    @staticmethod
    def backward(ctx, gg):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(gg, y, 0), None


class _Relu(Function):
    """``relu(x)`` (never in place: the output is saved) whose backward is :class:`_ReluGrad`."""

    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _ReluGrad.apply(g, y)


def _planes(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``(N, C, H, W)`` as ``(N, C, H * W)``, or as ``(N, H * W, C)`` in the channels-last format:
    a view where ``t`` has that layout, a copy where not."""
    n, c, h, w = t.shape  # sizes, not -1: N may be 0
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(n, h * w, c)
    return t.reshape(n, c, h * w)


def _unplanes(t: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    n, c, h, w = shape
    return t.view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else t.view(n, c, h, w)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class _MaxPoolGrad(Function):
    """Max pooling's input gradient: ``g`` added at each window's argmax (``idx``, flat over the
    plane, as ``max_pool2d_with_indices`` gives it), in the indices' memory format. Linear in ``g``;
    no derivative in the input, which PyTorch's rule builds as a zeros tensor of the input's size."""

    @staticmethod
    def forward(ctx, g, idx, shape):
        ctx.save_for_backward(idx)
        last = _is_channels_last(idx)
        n, c, h, w = shape
        out = g.new_zeros((n, h * w, c) if last else (n, c, h * w))
        out.scatter_add_(2 - last, _planes(idx, last), _planes(g, last))
        return _unplanes(out, shape, last)

    @staticmethod
    def backward(ctx, gg):
        (idx,) = ctx.saved_tensors
        last = _is_channels_last(idx)
        picked = _planes(gg, last).gather(2 - last, _planes(idx, last))
        return _unplanes(picked, idx.shape, last), None, None


class _MaxPool(Function):
    """``max_pool2d`` whose backward is :class:`_MaxPoolGrad` (keeps the indices, not the input)."""

    @staticmethod
    def forward(ctx, x, conf):
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, *conf)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        return _MaxPoolGrad.apply(g, idx, ctx.shape), None


# The rules are bound to each module as an instance attribute (``types.MethodType``, so a deepcopy
# made meanwhile rebinds to the copy). Convolutions: ``_conv_forward(input, weight, bias)``, which
# ``nn.Conv1d/2d/3d.forward`` calls and subclasses that transform the weight (weight
# standardisation, fake quantisation) call too; a subclass whose forward does not call it keeps
# PyTorch's rules. BatchNorm: ``forward``, only where the class does not override it.
def _inactive(module: nn.Module) -> bool:
    """PyTorch's rules for this call: the module is not under a check (a copy), or a ``torch.func``
    transform is running (our Functions have no functorch rules)."""
    return module not in _ACTIVE or torch._C._are_functorch_transforms_active()


def _conv_forward(self, input, weight, bias):  # noqa: A002 (the name nn.Conv2d uses)
    base = type(self)._conv_forward
    if (
        _inactive(self)
        or self.padding_mode != "zeros"
        or isinstance(self.padding, str)
        or input.dim() != weight.dim()
    ):
        return base(self, input, weight, bias)  # padding modes, string padding, unbatched inputs
    return _conv(input, weight, bias, (self.stride, self.padding, self.dilation, self.groups))


def _batch_norm_forward(self, input):  # noqa: A002
    if (
        _inactive(self)
        or self.training
        or self.running_mean is None
        or self.running_var is None
        or input.dtype not in (torch.float32, torch.float64)  # s and t would lose precision
    ):
        return type(self).forward(self, input)  # batch statistics, half precision
    return _eval_batch_norm(self, input)


def _relu_forward(self, input):  # noqa: A002
    if _inactive(self):
        return type(self).forward(self, input)
    return _Relu.apply(input)


def _max_pool_forward(self, input):  # noqa: A002
    if _inactive(self) or self.return_indices or input.dim() != 4 or input.device.type != "cpu":
        # indices asked for, unbatched inputs; GPUs: scatter_add_ adds with atomics there, so
        # overlapping windows would make products non-reproducible (and no gain was measured)
        return type(self).forward(self, input)
    pair = torch.nn.modules.utils._pair
    conf = (
        pair(self.kernel_size),
        pair(self.stride),
        pair(self.padding),
        pair(self.dilation),
        self.ceil_mode,
    )
    return _MaxPool.apply(input, conf)


def _rule(module: nn.Module) -> tuple[str, Callable] | None:
    """(attribute, method) that puts ``module`` under the rules above; None where they never apply."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        bases = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        if any(type(module)._conv_forward is b._conv_forward for b in bases):
            return "_conv_forward", _conv_forward
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        if type(module).forward is nn.modules.batchnorm._BatchNorm.forward:
            return "forward", _batch_norm_forward
    elif isinstance(module, nn.ReLU) and type(module).forward is nn.ReLU.forward:
        return "forward", _relu_forward
    elif isinstance(module, nn.MaxPool2d) and type(module).forward is nn.MaxPool2d.forward:
        return "forward", _max_pool_forward
    return None


def _compiled(model: nn.Module) -> bool:
    """``torch.compile``d modules trace the original methods; swapping them breaks the graph.
    ``torch.compile(model)`` wraps (``_orig_mod``); ``model.compile()`` sets ``_compiled_call_impl``."""
    return any(
        hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


def wanted(setting: bool | str, device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """``setting`` resolved: ``"auto"`` means on the CPU or a CUDA GPU without autocast, and on CUDA
    under bf16 autocast (where it was measured faster: a ResNet-18 estimate at 1,024 images took
    0.37x PyTorch's rules' time under bf16 on an H100, 1.10x at 128); other devices, fp16 and CPU
    autocast keep PyTorch's rules until measured there."""
    if not (setting is True or setting is False or setting == "auto"):  # 1 == True: not allowed
        raise ValueError(f"custom_rules must be True, False or 'auto', got {setting!r}")
    if setting == "auto":
        if autocast_dtype is None:
            return device.type in ("cpu", "cuda")
        return device.type == "cuda" and autocast_dtype == torch.bfloat16
    return bool(setting)


@contextlib.contextmanager
def second_order_rules(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: ``model``'s plain ``nn.Conv1d/2d/3d``, ``nn.BatchNorm*``, ``nn.ReLU`` and ``nn.MaxPool2d``
    modules build their graphs with the rules above (instance attributes, removed on exit). Module-level rather than a
    ``TorchFunctionMode``: non-reentrant activation checkpointing recomputes the forward during the
    backward, outside any mode, and the recomputation must save the same tensors as the forward.
    Nested uses are harmless (a module that already has the attribute is left alone). Not for
    concurrent use of one model from several threads: the modules are shared, and a second caller
    would run on whatever the first leaves in place. ``torch.compile``d models keep PyTorch's rules,
    and so do ``torch.func`` transforms run inside a check and copies made during one (a deepcopy
    keeps inert attributes; a shallow copy's BatchNorm would still read the original's parameters)."""
    swapped: list[tuple[nn.Module, str, Callable]] = []
    try:
        if enabled and not _compiled(model):
            for module in model.modules():
                rule = _rule(module)
                if rule is None or rule[0] in module.__dict__:  # an outer use's, or the user's own
                    continue
                name, method = rule
                bound = types.MethodType(method, module)
                setattr(module, name, bound)
                swapped.append((module, name, bound))
                _ACTIVE.add(module)
        yield
    finally:
        for module, name, bound in swapped:
            _ACTIVE.discard(module)
            if module.__dict__.get(name) is bound:  # replaced meanwhile: not ours to remove
                del module.__dict__[name]
