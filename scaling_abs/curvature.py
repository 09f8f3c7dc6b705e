"""Curvature of the training loss: Hessian-vector products, the top eigenvalue (power iteration,
the paper's, or Lanczos; from a random or a warm start), the trace.

The Hessian is that of the *mean* loss over a Hessian batch given as micro-batches (each weighted
by its size, so the answer does not depend on the split) and, with a process group, over every
rank's micro-batches (each rank's weighted HVP sum is all-reduced: ``autograd.grad`` never triggers
DDP's all-reduce, so it is explicit here).

Two HVP methods:
* ``double_backward``: ``grad(<grad(L), v>)``, the classic one (PyHessian, the paper's code); works
  with non-reentrant activation checkpointing and autocast.
* ``forward_over_reverse``: ``torch.func.jvp`` of ``torch.func.grad``; one pass yields the gradient
  and the HVP together. Fails with activation checkpointing and, under autocast, with the ViT (the
  BatchNorm and LayerNorm models work: normalisation layers' tangents are cast back, see
  ``_segmented``). ``auto`` uses double
  backward on CPU (1.7x faster for the small CNN, 8x for the MLP on 2 cores) and on an accelerator
  measures both once per kind of model and keeps the faster.

Every public function leaves the model as it found it: each module's train/eval mode, its buffers
(BatchNorm running statistics), the parameters' ``.grad`` and the global RNG state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from scaling_abs import _second_order, _segmented, distributed
from scaling_abs._segmented import Chain, _acc, _cross_entropy_head, units_of  # noqa: F401 (Chain, units_of: public here)
from scaling_abs.errors import is_whole

LossFn = Callable[[nn.Module, Any], torch.Tensor]
METHODS = ("auto", "double_backward", "forward_over_reverse")
# 1024 keeps fp16 gradients of O(1e-4) representable; the HVP is linear in the loss, so it is divided back.
FP16_LOSS_SCALE = 1024.0
_AUTO_CHOICE: dict[tuple, str] = {}
# ``method="auto"``'s choice on these devices without timing both methods first: on the CPU double
# backward was faster for every model we measured (benchmarks/bench_hvp.py), and timing would also
# pay torch.func's ~2 s first-call set-up. Elsewhere the first product of a kind of model times both.
AUTO_UNTIMED: dict[str, str] = {"cpu": "double_backward"}


@dataclass
class EigenResult:
    """Top eigenvalue by power iteration. ``finite`` is False when an HVP or the estimate was not
    finite (fp16 overflow, a bad batch); the eigenvalue is then NaN and ``converged`` False.
    ``kept_graphs``: how many of this rank's micro-batches had their gradient graph kept (see
    :class:`HessianOperator`'s ``reuse_graph``)."""

    eigenvalue: float
    eigenvector: list[torch.Tensor] = field(repr=False)
    iterations: int
    converged: bool
    finite: bool = True
    samples: int = 0
    kept_graphs: int = 0


@dataclass
class TraceResult:
    """Hutchinson estimate of the Hessian trace: the mean of ``v^T H v`` over Rademacher probes."""

    trace: float
    std_error: float
    probes: int
    samples: int = 0
    finite: bool = True


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The ``loss_fn`` for ``(inputs, targets)`` batches, computed in fp32 (fp64 for an fp64 model)."""
    return _cross_entropy_head(model(batch[0]), batch)


NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def last_layers(model: nn.Module, n: int) -> list[nn.Parameter]:
    """Trainable parameters of the last ``n`` layers: the block Hessian of paper Section 4.3 ("the
    last two layers of C1"). A layer is a module that owns parameters directly and is not a
    normalization layer (BatchNorm, LayerNorm, GroupNorm, in ``model.modules()`` order); the
    normalization layers after the first of the ``n`` belong to them (ResNet-18's ``last:2``: its
    last convolution, that convolution's BatchNorm and the classifier). A model of normalization
    layers only counts those. ``n`` beyond the model's :func:`layer_count`: every layer (the
    trainer refuses that as a setting: the block would be the whole model under a block's name)."""
    if n < 1:
        raise ValueError(f"last_layers: n must be >= 1, got {n}")
    owners, layers = _layers(model)
    first = layers[-n] if n <= len(layers) else 0
    params = [p for m in owners[first:] for p in m.parameters(recurse=False) if p.requires_grad]
    return list({id(p): p for p in params}.values())  # a weight tied between two of them, once


def _layers(model: nn.Module) -> tuple[list[nn.Module], list[int]]:
    """The modules that own parameters, and the places among them of the layers that count."""
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    layers = [i for i, m in enumerate(owners) if not isinstance(m, NORMALIZATION)] or list(range(len(owners)))
    return owners, layers


def layer_count(model: nn.Module) -> int:
    """How many layers :func:`last_layers` counts in ``model`` (``last:N`` takes N of them)."""
    return len(_layers(model)[1])


def parse_block(spec: str) -> int | None:
    """``"all"`` -> None, ``"last:N"`` -> N (> 0); anything else a ValueError naming hessian_block.
    ASCII digits only: ``str.isdigit`` also takes superscripts, which ``int`` refuses."""
    count = spec[5:]
    if spec == "all":
        return None
    if spec.startswith("last:") and count.isascii() and count.isdigit() and int(count) > 0:
        return int(count)
    raise ValueError(f"hessian_block: expected all or last:N with N > 0, got {spec!r}")


def resolve_block(model: nn.Module, spec: str) -> list[nn.Parameter]:
    """``"all"`` (every trainable parameter) or ``"last:N"`` (see :func:`last_layers`)."""
    n = parse_block(spec)
    return [p for p in model.parameters() if p.requires_grad] if n is None else last_layers(model, n)


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit (a model may mix them on purpose)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved_state(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Run in ``bn_mode`` ("eval": the whole model in eval mode, running statistics, the paper's code;
    "train": the same but batch-normalisation layers in train mode, batch statistics; dropout stays
    off either way, so the Hessian is a function of the batch) and restore modes, buffers and the
    global RNG state afterwards."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    cuda_rng = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    # Batch statistics without touching running stats: a BatchNorm in train mode that does not
    # track them normalises by the batch and writes nothing (forward-mode AD rejects in-place updates).
    all_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    norms = [m for m in all_norms if m.track_running_stats]
    with preserved_modes(model):
        model.eval()
        if bn_mode == "train":
            for m in all_norms:
                m.training = True
            for m in norms:
                m.track_running_stats = False
        try:
            yield
        finally:
            for m in norms:
                m.track_running_stats = True
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    return _batch_size(batch[0])


def _zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))


def _fp16_unit(
    vector: Sequence[torch.Tensor], autocast_dtype
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Under fp16, ``(v / ||v||, ||v||)``: ``H v`` is linear in ``v``, and fp16's range (65,504) met
    with the loss scale and a vector of norm 25 already overflowed with train-mode BatchNorm
    (Hutchinson's Rademacher probes have norm sqrt(parameters)). Elsewhere ``(v, None)``."""
    vector = list(vector)
    if autocast_dtype != torch.float16 or not vector:
        return vector, None
    norm = torch.sqrt(sum((v.float() * v.float()).sum() for v in vector))
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # a zero vector stays zero
    return [v / norm.to(v.dtype) for v in vector], norm


def _scaled_back(hv: list[torch.Tensor], norm: torch.Tensor | None) -> list[torch.Tensor]:
    """``hv`` times ``norm`` (fp16's unit vector undone), each tensor in the default layout: on the
    CPU our rules' convolutions give channels-last gradients (:func:`_second_order._channels_last`)."""
    if norm is not None:
        hv = [h * norm.to(h.dtype) for h in hv]
    return [h.contiguous() for h in hv]


def _autocast(params: Sequence[torch.Tensor], dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=params[0].device.type, dtype=dtype)


def _math_sdpa(enabled: bool):
    """Flash and memory-efficient attention have no double backward and no forward-mode AD."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _gradient_graph(model, loss_fn, batch, params, autocast_dtype) -> tuple[tuple, float]:
    """``grad(L)`` w.r.t. ``params`` with its graph kept (``create_graph=True``), and the loss scale
    it carries (fp16 only). Differentiating it again against ``v`` gives ``H v``."""
    scale = FP16_LOSS_SCALE if autocast_dtype == torch.float16 else 1.0
    with _autocast(params, autocast_dtype):
        loss = _loss(loss_fn, model, batch)
    grads = torch.autograd.grad(_acc(loss) * scale, params, create_graph=True, allow_unused=True)
    return grads, scale


def _hvp_from_graph(grads, params, vector, scale, *, retain_graph: bool) -> list[torch.Tensor]:
    """``H v`` as the vector-Jacobian product of the gradient with ``v``: one reverse pass through the
    gradient's graph (``grad(<g, v>)`` without building the dot product); fp32 (fp64 stays)."""
    used = [(p, g, v) for p, g, v in zip(params, grads, vector) if g is not None]
    raw: list[torch.Tensor | None] = []
    if used:
        raw = list(
            torch.autograd.grad(
                [g for _, g, _ in used],
                [p for p, _, _ in used],
                grad_outputs=[v.to(g.dtype) for _, g, v in used],
                allow_unused=True,
                retain_graph=retain_graph,
            )
        )
    out, k = [], 0
    for p, g in zip(params, grads):
        h = None
        if g is not None:
            # each raw product is let go once divided, so the two copies of Hv never coexist
            h, raw[k] = raw[k], None
            k += 1
        out.append(_zeros(p) if h is None else _acc(h) / scale)
    return out


def _double_backward(model, loss_fn, batch, params, vector, autocast_dtype, rules: bool):
    """Both passes under our second-order rules when ``rules`` (see :func:`grad_and_hvp`)."""
    with _second_order.second_order_rules(model, rules):
        grads, scale = _gradient_graph(model, loss_fn, batch, params, autocast_dtype)
        out_g = [_zeros(p) if g is None else _acc(g.detach()) / scale for p, g in zip(params, grads)]
        return out_g, _hvp_from_graph(grads, params, vector, scale, retain_graph=False)


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can swap the parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _forward_over_reverse(model, loss_fn, batch, params, vector, autocast_dtype):
    from torch.func import functional_call, grad, jvp

    wrapper = _LossModule(model, loss_fn)
    ids = {id(p) for p in params}
    names = {id(p): n for n, p in wrapper.named_parameters()}
    fixed = {n: p.detach() for n, p in wrapper.named_parameters() if id(p) not in ids}
    # Cloned buffers: BatchNorm in train mode updates them in place, which forward-mode AD rejects.
    fixed.update({n: b.clone() for n, b in wrapper.named_buffers()})
    keys = [names[id(p)] for p in params]
    # fp16: the same loss scale as double backward (without it, a unit vector's product lost 4-6x
    # the accuracy to underflow); the products are linear in the loss, so it is divided back
    scale = FP16_LOSS_SCALE if autocast_dtype == torch.float16 else 1.0

    def loss_of(*flat):
        # under autocast a normalisation layer's value and tangent can differ in dtype (BatchNorm's
        # forward-mode rule, LayerNorm run in fp32), which the next layer refuses: cast back
        with (
            _segmented.norm_tangents_follow_values() if autocast_dtype else contextlib.nullcontext(),
            _autocast(params, autocast_dtype),
        ):
            return _acc(functional_call(wrapper, {**fixed, **dict(zip(keys, flat))}, (batch,))) * scale

    primals = tuple(p.detach() for p in params)
    tangents = tuple(v.to(p.dtype) for p, v in zip(params, vector))
    g, h = jvp(grad(loss_of, argnums=tuple(range(len(params)))), primals, tangents)
    return [_acc(x) / scale for x in g], [_acc(x) / scale for x in h]


def _timed(fn, *args) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def grad_and_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    vector: Sequence[torch.Tensor],
    *,
    params: Sequence[torch.Tensor],
    method: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    custom_rules: bool | str = "auto",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradient and HVP of ``loss_fn(model, batch)`` w.r.t. ``params`` in one call (fp32 results,
    fp64 for fp64 parameters). No mode or buffer handling: the public functions wrap this in
    :func:`preserved_state`.

    ``method="auto"``: double backward on CPU (faster in every CPU measurement); on an accelerator it
    measures both methods once per (architecture, device, autocast dtype) and keeps the faster,
    dropping forward-over-reverse when it fails (activation checkpointing, ops without forward-mode
    rules).

    ``custom_rules`` (double backward only): differentiate convolutions, eval-mode BatchNorm, ReLU and
    max pooling with our own rules (:mod:`scaling_abs._second_order`; the same HVP, each second-order
    convolution a kernel training uses instead of PyTorch's generic double-backward formula, no
    zeros carried back from ReLU and pooling). ``"auto"``: on the
    CPU and on CUDA without autocast or under bf16, where it was measured faster; PyTorch's rules elsewhere.
    """
    params = _trainable(model, params)
    _check_method_and_dtype(method, autocast_dtype)
    rules = _second_order.wanted(custom_rules, params[0].device, autocast_dtype)  # a bad value fails here
    vector, norm = _fp16_unit(vector, autocast_dtype)
    g, hv = _grad_and_hvp(model, loss_fn, batch, params, vector, autocast_dtype, method, rules)
    return _scaled_back(g, None), _scaled_back(hv, norm)


def _grad_and_hvp(model, loss_fn, batch, params, vector, autocast_dtype, method, rules: bool):
    """:func:`grad_and_hvp` with ``rules`` resolved and ``vector`` as it is (no fp16 unit vector:
    :class:`HessianOperator` makes it once per product, for all its micro-batches). ``method`` was
    checked by the caller (:func:`_check_method_and_dtype`)."""
    device = params[0].device
    args = (model, loss_fn, batch, params, vector, autocast_dtype)
    if method == "double_backward":
        return _double_backward(*args, rules)
    if method == "forward_over_reverse":
        return _forward_over_reverse(*args)
    key = (_architecture(model), device.type, autocast_dtype, rules)
    choice = _AUTO_CHOICE.get(key)
    if choice is None and device.type in AUTO_UNTIMED:
        choice = _AUTO_CHOICE[key] = AUTO_UNTIMED[device.type]
    if choice == "double_backward":
        return _double_backward(*args, rules)
    if choice == "forward_over_reverse":
        return _forward_over_reverse(*args)
    try:  # first call for this kind of model: time both (the second run of each, after warm-up)
        _forward_over_reverse(*args)
        t_for, out_for = _timed(_forward_over_reverse, *args)
    except Exception:
        _AUTO_CHOICE[key] = "double_backward"
        return _double_backward(*args, rules)
    _double_backward(*args, rules)
    t_db, out_db = _timed(_double_backward, *args, rules)
    _AUTO_CHOICE[key] = "forward_over_reverse" if t_for < t_db else "double_backward"
    return out_for if t_for < t_db else out_db


def _architecture(model: nn.Module) -> int:
    """A key for "this kind of model": its module classes in order (wrappers alone say nothing)."""
    return hash(tuple(type(m).__name__ for m in model.modules()))


def auto_choice(
    model: nn.Module,
    device: str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    custom_rules: bool | str = "auto",
) -> str | None:
    """What ``method="auto"`` settled on for this kind of model (None before its first HVP)."""
    rules = _second_order.wanted(custom_rules, torch.device(device), autocast_dtype)
    return _AUTO_CHOICE.get((_architecture(model), device, autocast_dtype, rules))


def chain(model: nn.Module) -> Chain:
    """The :class:`Chain` a checkpointed HVP of ``cross_entropy_loss`` walks (see ``units_of``)."""
    return _segmented.chain(model)


def _chain(model: nn.Module, loss_fn: LossFn, checkpoint: bool | Chain) -> Chain | None:
    """``checkpoint``: False (none), True (the model's own chain, for ``cross_entropy_loss``), a Chain."""
    if isinstance(checkpoint, Chain):
        return checkpoint
    if checkpoint is False:
        return None
    if checkpoint is not True:
        raise ValueError(f"checkpoint must be True, False or a curvature.Chain, got {checkpoint!r}")
    if loss_fn is not cross_entropy_loss:
        raise ValueError(
            "checkpoint=True describes cross_entropy_loss; for another loss_fn pass a curvature.Chain "
            "with its inputs and loss"
        )
    return _segmented.chain(model)


def _check_method_and_dtype(method: str, autocast_dtype: torch.dtype | None) -> None:
    """Checked up front: a path that never reaches the method's dispatch (one micro-batch, kept
    graph) would otherwise run with a misspelt method silently."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(
            f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}"
        )


def _check_iteration_settings(max_iter: Any, tol: Any) -> None:
    if not is_whole(max_iter, 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


FIT_RESERVE = 0.05
"""``reuse_graph="fit"``: the share of the device's memory a check leaves free besides its products."""
MEASURED_DEVICES = ("cuda",)
"""Device types whose memory :func:`_device_memory` reads (``reuse_graph="fit"`` needs it)."""


def _device_memory(device: torch.device) -> tuple[int, int, int]:
    """``(allocated, available, total)`` bytes of a CUDA device: what PyTorch's tensors hold, what
    could still be allocated (the driver's free memory and the caching allocator's unused blocks),
    the device's size."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    return allocated, free + torch.cuda.memory_reserved(device) - allocated, total


def _trainable(model: nn.Module, params: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """``params`` checked: the model's own trainable parameters, each once (default: all of them).
    A tensor that is not one of them would get a zero block and a silent eigenvalue of 0."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        if isinstance(params, torch.Tensor):
            raise TypeError("params: a sequence of parameters (e.g. [model.fc.weight]), got one tensor")
        params = list(params)
        owned = {id(p) for p in model.parameters()}
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                hint = " (named_parameters() gives (name, parameter) pairs)" if isinstance(p, tuple) else ""
                raise TypeError(f"params[{i}]: expected a parameter, got {type(p).__name__}{hint}")
            if id(p) not in owned:
                raise ValueError(f"params[{i}]: not a parameter of the model (a copy, or another model's?)")
            if id(p) in seen:
                raise ValueError(f"params[{i}]: given twice")
            if not p.requires_grad:
                raise ValueError(f"params[{i}]: does not require grad (frozen); leave it out")
            seen.add(id(p))
    if not params:
        raise ValueError("params: no trainable parameters to take the Hessian over")
    return params


def _loss(loss_fn: LossFn, model: nn.Module, batch: Any) -> torch.Tensor:
    """``loss_fn(model, batch)``, which must be a scalar tensor with a graph to differentiate."""
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (e.g. a mean over the batch), got {got}")
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn's loss does not depend on the parameters (detached, or computed under no_grad / "
            "inference_mode?)"
        )
    return loss.reshape(())


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    vector: Sequence[torch.Tensor],
    *,
    params: Sequence[torch.Tensor] | None = None,
    method: str = "auto",
    bn_mode: str = "eval",
    autocast_dtype: torch.dtype | None = None,
    sdpa_math: bool = True,
    custom_rules: bool | str = "auto",
    checkpoint: bool | Chain = False,
) -> list[torch.Tensor]:
    """Hessian-vector product ``H v`` of ``loss_fn(model, batch)`` w.r.t. ``params``.

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        vector: tensors shaped like ``params`` (default: all trainable parameters).
        method: ``"auto" | "double_backward" | "forward_over_reverse"``.
        bn_mode: ``"eval"`` (default, the paper's code) or ``"train"`` (batch statistics).
        custom_rules: see :func:`grad_and_hvp`.
        checkpoint: recompute the model piece by piece (see :class:`HessianOperator`); ``method``
            does not apply then.
    Returns:
        fp32 tensors shaped like ``params``. The model is left as it was.
    """
    params = _trainable(model, params)
    _check_shapes(vector, params, "vector")
    with _checking(model, bn_mode, sdpa_math):
        ch = _chain(model, loss_fn, checkpoint)
        if ch is not None:
            op = HessianOperator(
                model,
                loss_fn,
                [batch],
                params,
                autocast_dtype=autocast_dtype,
                sdpa_math=sdpa_math,
                custom_rules=custom_rules,
                checkpoint=ch,
                reduce=False,
            )
            return op(vector)
        return grad_and_hvp(
            model,
            loss_fn,
            batch,
            vector,
            params=params,
            method=method,
            autocast_dtype=autocast_dtype,
            custom_rules=custom_rules,
        )[1]


class HessianOperator:
    """``v -> H v`` for the Hessian of the mean loss over ``batches`` (all ranks together).

    ``reuse_graph``: build each micro-batch's gradient graph once (``create_graph=True``) and
    differentiate it again for every vector, instead of a new forward and backward per HVP. The
    power iteration's HVPs then cost one reverse pass each (about 1.7x faster on the CPU ResNet-18:
    ``benchmarks/bench_hvp.py``), at the memory of keeping every micro-batch's graph at once.
    ``"auto"`` reuses when this rank's Hessian batch is one micro-batch: its graph is as large as
    the one a fresh HVP builds anyway, so the peak memory does not change. With several micro-batches
    on a CUDA device ``"auto"`` becomes ``"fit"``: the first product keeps each micro-batch's graph
    while the device's free memory holds it (after keeping one, there must remain twice its size and
    :data:`FIT_RESERVE` of the device's memory for the products); from the first micro-batch whose
    graph would not fit on, products are fresh. On other devices several micro-batches get fresh products
    (``hessian_micro_batch_size`` is then what bounds the memory). Reuse is double backward (a graph
    to differentiate again); ``method="forward_over_reverse"`` turns it off.
    ``sdpa_math``: products run with the math attention kernel (flash and memory-efficient attention
    have no double backward), also when the operator is used directly.
    ``custom_rules``: our second-order rules for convolutions, eval-mode BatchNorm, ReLU and max
    pooling (see :func:`grad_and_hvp`).
    ``checkpoint``: True (the model's :func:`chain`, for ``cross_entropy_loss``) or a :class:`Chain`:
    each product recomputes the model piece by piece (:mod:`scaling_abs._segmented`), so the peak
    memory is the pieces' cuts plus one piece's second-order graph instead of the whole model's;
    about one more forward and one recomputed forward per product. No graph is kept (``reuse_graph``
    does not apply) and ``method`` is ignored.
    ``reduce``: all-reduce over the process group (False: this rank's products only).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        params: Sequence[torch.Tensor],
        *,
        method: str = "auto",
        autocast_dtype: torch.dtype | None = None,
        reuse_graph: bool | str = "auto",
        sdpa_math: bool = True,
        custom_rules: bool | str = "auto",
        checkpoint: bool | Chain = False,
        reduce: bool = True,
    ):
        if reuse_graph not in (True, False, "auto"):
            raise ValueError(f"reuse_graph must be True, False or 'auto', got {reuse_graph!r}")
        _check_method_and_dtype(method, autocast_dtype)
        self.model, self.loss_fn, self.params = model, loss_fn, _trainable(model, params)
        self.batches = list(batches)
        self.method, self.autocast_dtype, self.sdpa_math = method, autocast_dtype, sdpa_math
        device = self.params[0].device if self.params else torch.device("cpu")
        self.custom_rules = _second_order.wanted(custom_rules, device, autocast_dtype)  # resolved
        sizes = [_batch_size(b) for b in self.batches]
        self.reduce = reduce
        total = float(sum(sizes))
        self.samples = int(distributed.all_reduce_sum(total) if reduce else total)
        if self.samples == 0:
            raise ValueError("batches: the Hessian batch is empty")
        self.weights = [n / self.samples for n in sizes]
        ch = _chain(model, loss_fn, checkpoint)
        if ch is not None and reuse_graph is True:
            raise ValueError(
                "reuse_graph=True and checkpoint exclude each other: a checkpointed product keeps no graph"
            )
        self._segmented = None if ch is None else _segmented.SegmentedHVP(model, ch, self.params)
        if method == "forward_over_reverse" or ch is not None:
            reuse_graph = False
        if reuse_graph == "auto":
            several = len(self.batches) > 1
            reuse_graph = "fit" if several and device.type in MEASURED_DEVICES else not several
        self.reuse_graph: bool | str = reuse_graph  # True, False or "fit"
        self._graphs: list[tuple[tuple, float]] | None = None
        self._keeping = True  # "fit": the next micro-batch's graph may still be kept

    @property
    def kept_graphs(self) -> int:
        """How many micro-batches' graphs are kept now (0 before the first product)."""
        return len(self._graphs or ())

    def _hvp(self, index: int, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        batch = self.batches[index]
        if self._segmented is not None:
            return self._segmented(
                batch,
                vector,
                autocast_dtype=self.autocast_dtype,
                rules=lambda: _second_order.second_order_rules(self.model, self.custom_rules),
                scale=FP16_LOSS_SCALE if self.autocast_dtype == torch.float16 else 1.0,
            )
        if not self.reuse_graph:  # the vector is already the fp16 unit one (__call__)
            return self._fresh(index, vector)
        if self.reuse_graph == "fit":
            return self._hvp_fit(index, vector)
        if self._graphs is None:  # built at the first product, kept until the operator is dropped
            self._graphs = [
                _gradient_graph(self.model, self.loss_fn, b, self.params, self.autocast_dtype)
                for b in self.batches
            ]
        grads, scale = self._graphs[index]
        return _hvp_from_graph(grads, self.params, vector, scale, retain_graph=True)

    def _fresh(self, index: int, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Micro-batch ``index``'s product from a new forward and backward (no graph kept)."""
        return _grad_and_hvp(
            self.model,
            self.loss_fn,
            self.batches[index],
            self.params,
            vector,
            self.autocast_dtype,
            self.method,
            self.custom_rules,
        )[1]

    def _hvp_fit(self, index: int, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``reuse_graph="fit"``: the kept graph of micro-batch ``index``; at the first product each
        micro-batch's graph is built in turn and kept while the memory holds it (its size measured
        as the allocator's growth); from the first one that did not fit on, fresh products."""
        self._graphs = [] if self._graphs is None else self._graphs
        if index < len(self._graphs):
            grads, scale = self._graphs[index]
            return _hvp_from_graph(grads, self.params, vector, scale, retain_graph=True)
        if not (self._keeping and index == len(self._graphs)):
            return self._fresh(index, vector)
        device = self.params[0].device
        before = _device_memory(device)
        grads, scale = _gradient_graph(
            self.model, self.loss_fn, self.batches[index], self.params, self.autocast_dtype
        )
        after = _device_memory(device)
        size = max(0, after[0] - before[0])
        keep = after[1] >= 2 * size + FIT_RESERVE * after[2]
        if keep:
            self._graphs.append((grads, scale))
        self._keeping = keep and index + 1 < len(self.batches)
        return _hvp_from_graph(grads, self.params, vector, scale, retain_graph=keep)

    def __call__(self, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        vector, norm = _fp16_unit(vector, self.autocast_dtype)
        total: list[torch.Tensor] | None = None
        # Kept graphs: built and differentiated under the same rules (a checkpointed forward is
        # recomputed in either pass); fresh products set them up themselves (_double_backward).
        rules = _second_order.second_order_rules(
            self.model, self.custom_rules and self.reuse_graph is not False
        )
        with _math_sdpa(self.sdpa_math), rules:  # also when used directly, not only under top_eigenvalue
            for i, w in enumerate(self.weights):
                hv = self._hvp(i, vector)  # new tensors (every path divides by its loss scale)
                if total is None:  # the first product is the sum: no zero vector beside it
                    total = hv if w == 1.0 else [x.mul_(w) for x in hv]
                else:
                    for t, x in zip(total, hv):
                        t.add_(x, alpha=w)
                del hv
        total = _scaled_back(total, norm)
        return distributed.all_reduce_sum_(total) if self.reduce else total

    def release(self) -> None:
        """Drop the kept graphs (their memory) now rather than when the operator goes away; the
        next product builds them again (``"fit"``: as many as fit then)."""
        self._graphs = None
        self._keeping = True


@contextlib.contextmanager
def _checking(model: nn.Module, bn_mode: str, sdpa_math: bool) -> Iterator[None]:
    """The state every curvature computation runs in: ``bn_mode``, the math attention kernel, and
    the model's modes, buffers and the RNG restored afterwards."""
    with preserved_state(model, bn_mode), _math_sdpa(sdpa_math):
        yield


@contextlib.contextmanager
def _operator(model, loss_fn, batches, params, **kw) -> Iterator[HessianOperator]:
    """A :class:`HessianOperator` whose kept graphs are dropped on exit, errors included."""
    op = HessianOperator(model, loss_fn, batches, params, **kw)
    try:
        yield op
    finally:
        op.release()


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalize(
    v: list[torch.Tensor], sq: float | None = None, *, inplace: bool = False
) -> list[torch.Tensor]:
    """``v / ||v||``; ``sq``, the squared norm when the caller already has it on the host;
    ``inplace``: ``v``'s own tensors divided (for a vector nothing else holds)."""
    norm = torch.sqrt(_dot(v, v)) if sq is None else math.sqrt(sq)
    return [x.div_(norm + 1e-30) if inplace else x / (norm + 1e-30) for x in v]


def _gaussian(params: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """A standard normal vector shaped like ``params``, from its own CPU generator (so the same on
    every rank and independent of the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.device, _zeros(p).dtype) for p in params]


def _check_shapes(vector: Sequence[torch.Tensor], params: Sequence[torch.Tensor], name: str) -> None:
    if len(vector) != len(params) or any(x.shape != p.shape for x, p in zip(vector, params)):
        raise ValueError(
            f"{name}: expected {len(params)} tensors shaped like params, got "
            f"{[tuple(x.shape) for x in vector][:4]}{'...' if len(vector) > 4 else ''}"
        )


def warm_start(
    previous: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, seed: int, noise: float = 0.5
) -> list[torch.Tensor]:
    """A start vector for the next eigenvalue estimate: the previous eigenvector (unit norm) plus a
    seeded random direction of norm ``noise``. Close to the answer when the top direction moved
    little since the last estimate. The random part makes every direction present (started exactly
    on another eigenvector, power iteration would never leave it); it does not make a nearly absent
    direction grow faster: on real checks noise 0 and 0.5 gave the same estimates, and a warm-started
    power iteration once stopped 34 % low on the previous top direction where Lanczos did not
    (``benchmarks/bench_solvers.py``). Use it with ``solver="lanczos"``."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    _check_shapes(previous, params, "previous")
    prev = _normalize([x.detach().to(p.device, _zeros(p).dtype) for x, p in zip(previous, params)])
    if noise == 0:
        return prev
    rand = _normalize(_gaussian(params, seed))
    return [a + noise * b for a, b in zip(prev, rand)]


def _power(op: HessianOperator, v: list[torch.Tensor], max_iter: int, tol: float):
    """Power iteration from unit ``v``: (eigenvalue, vector, iterations, converged, finite)."""
    eig, it = float("nan"), 0
    for it in range(1, max_iter + 1):  # noqa: B007 (read after the loop)
        hv = op(v)
        # sync point, one per iteration: the convergence test needs the Rayleigh quotient on the
        # host; a non-finite entry of Hv makes it or the norm non-finite too.
        new, sq = torch.stack([_dot(hv, v), _dot(hv, hv)]).tolist()
        if not (math.isfinite(new) and math.isfinite(sq)):
            return float("nan"), v, it, False, False
        # in place: Hv is the operator's own new vector, and the previous v is let go, so a product
        # runs beside one vector, not two (classic keeps the last Hv alive beside the new v)
        v = _normalize(hv, sq, inplace=True)
        del hv
        done = math.isfinite(eig) and abs(new - eig) <= tol * (abs(eig) + 1e-12)
        eig = new
        if done:
            return eig, v, it, True, True
    return eig, v, it, False, True


def _lanczos(op: HessianOperator, v: list[torch.Tensor], max_iter: int, tol: float):
    """Lanczos from unit ``v`` with full reorthogonalisation: after ``k`` products the top Ritz value
    of the ``k``-dimensional Krylov space, which is never further from the top eigenvalue than the
    power iteration's ``k``-th estimate and usually much closer (Chebyshev rather than geometric
    convergence; near-equal top eigenvalues separate in a few products). Holds ``max_iter`` flat
    vectors the size of ``params`` (fp32, allocated at the start). Stops like the power iteration:
    the relative change of the estimate ``<= tol``, or after ``max_iter`` products, or when the
    Krylov space is exhausted (exact)."""
    shapes = [x.shape for x in v]
    sizes = [x.numel() for x in v]

    def unflat(flat: torch.Tensor) -> list[torch.Tensor]:
        return [x.view(shape) for x, shape in zip(flat.split(sizes), shapes)]

    first = torch.cat([x.reshape(-1) for x in v])
    basis = first.new_empty((max_iter, first.numel()))  # row k: the k-th Lanczos vector
    basis[0] = first
    alphas: list[float] = []
    betas: list[float] = []
    theta, it = float("nan"), 0
    y = torch.ones(1, dtype=torch.float64)
    for it in range(1, max_iter + 1):  # noqa: B007 (read after the loop)
        q = basis[:it]  # a view: no copy of the basis
        w = torch.cat([x.reshape(-1) for x in op(unflat(q[-1]))])
        # full reorthogonalisation against the whole basis (classical Gram-Schmidt, twice); the
        # first pass's coefficient on the newest vector is alpha; no host sync until the end
        coeffs = q @ w
        w = w - q.T @ coeffs
        again = q @ w
        w = w - q.T @ again
        # sync point, one per iteration: alpha, beta and the Ritz values are needed on the host
        alpha, beta_sq = torch.stack([coeffs[-1] + again[-1], w @ w]).tolist()
        if not (math.isfinite(alpha) and math.isfinite(beta_sq)):
            return float("nan"), unflat(q[-1].clone()), it, False, False
        alphas.append(alpha)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(t)
        top = int(values.abs().argmax())
        new, y = float(values[top]), vectors[:, top]
        done = math.isfinite(theta) and abs(new - theta) <= tol * (abs(theta) + 1e-12)
        theta = new
        beta = math.sqrt(max(beta_sq, 0.0))
        if done or beta <= 1e-10 * (abs(theta) + 1e-30):  # converged, or an invariant subspace
            return theta, unflat(_ritz_vector(q, y)), it, True, True
        if it < max_iter:
            basis[it] = w / beta
            betas.append(beta)
    return theta, unflat(_ritz_vector(basis[:it], y)), it, False, True


def _ritz_vector(basis: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unit vector ``sum_i y_i basis[i]`` (flat)."""
    x = y.to(basis.device, basis.dtype) @ basis
    return x / (x.norm() + 1e-30)


SOLVERS = ("power", "lanczos")


def top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    params: Sequence[torch.Tensor] | None = None,
    max_iter: int = 10,
    tol: float = 1e-2,
    seed: int = 0,
    method: str = "auto",
    bn_mode: str = "eval",
    autocast_dtype: torch.dtype | None = None,
    sdpa_math: bool = True,
    reuse_graph: bool | str = "auto",
    init: Sequence[torch.Tensor] | None = None,
    solver: str = "power",
    custom_rules: bool | str = "auto",
    checkpoint: bool | Chain = False,
) -> EigenResult:
    """Top (largest-magnitude) Hessian eigenvalue by power iteration (or Lanczos).

    Args:
        batches: micro-batches whose size-weighted mean loss defines the Hessian; with a process
            group, this rank's share of the Hessian batch.
        params: the block (default: all trainable parameters; see :func:`last_layers`).
        max_iter, tol: stop after ``max_iter`` HVPs or when the relative change is ``<= tol``.
        seed: the start vector's own generator (the global RNG is not used).
        method: ``"auto" | "double_backward" | "forward_over_reverse"`` (see :func:`grad_and_hvp`).
        bn_mode: ``"eval"`` (running statistics, the paper's code) or ``"train"`` (batch statistics).
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` for the forward and backward work;
            the vectors and Rayleigh quotients stay fp32.
        reuse_graph: keep each micro-batch's gradient graph for all iterations (see
            :class:`HessianOperator`; ``"auto"``: when this rank has one micro-batch, and on CUDA
            as many micro-batches' graphs as the free memory holds).
        init: the start vector (any norm, shaped like ``params``), e.g. the previous check's
            eigenvector to warm-start from (see :func:`warm_start`); default: a random one from
            ``seed``. It must be the same on every rank.
        solver: ``"power"`` (the paper's) or ``"lanczos"`` (the same products, a better estimate
            from them; keeps ``max_iter`` vectors: see :func:`_lanczos`).
        custom_rules: our second-order rules for convolutions, eval-mode BatchNorm, ReLU and max
            pooling (the same products, faster on the CPU and for ResNet-18 on an H100; ``"auto"``: on the CPU and CUDA
            without autocast or in bf16; see :func:`grad_and_hvp`).
        checkpoint: recompute the model piece by piece in every product, for memory (True: the
            model's :func:`chain`, for ``cross_entropy_loss``; or a :class:`Chain`; see
            :class:`HessianOperator`).
    Returns:
        :class:`EigenResult`; the eigenvector is unit-norm, shaped like ``params``, fp32 (fp64 for
        fp64 parameters).
    """
    _check_iteration_settings(max_iter, tol)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    params = _trainable(model, params)
    if init is None:
        # Same start vector on every rank: drawn on the CPU from the seed, then moved.
        v = _normalize(_gaussian(params, seed))
    else:
        _check_shapes(init, params, "init")
        v = [x.detach().to(p.device, _zeros(p).dtype) for x, p in zip(init, params)]
        sq = float(_dot(v, v))  # sync point, once: the start vector's norm
        if not math.isfinite(sq) or sq == 0.0:
            raise ValueError("init: the start vector is zero or not finite")
        v = _normalize(v, sq)
    kw = {
        "method": method,
        "autocast_dtype": autocast_dtype,
        "reuse_graph": reuse_graph,
        "sdpa_math": sdpa_math,
        "custom_rules": custom_rules,
        "checkpoint": checkpoint,
    }
    run = _power if solver == "power" else _lanczos
    with _checking(model, bn_mode, sdpa_math), _operator(model, loss_fn, batches, params, **kw) as op:
        eig, v, it, converged, finite = run(op, v, max_iter, tol)
        kept = op.kept_graphs
    return EigenResult(eig, v, it, converged, finite=finite, samples=op.samples, kept_graphs=kept)


def hutchinson_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    params: Sequence[torch.Tensor] | None = None,
    n_samples: int = 20,
    seed: int = 0,
    method: str = "auto",
    bn_mode: str = "eval",
    autocast_dtype: torch.dtype | None = None,
    sdpa_math: bool = True,
    reuse_graph: bool | str = "auto",
    custom_rules: bool | str = "auto",
    checkpoint: bool | Chain = False,
) -> TraceResult:
    """Hutchinson's estimate ``E[v^T H v]`` with Rademacher ``v`` from a seeded generator."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    params = _trainable(model, params)
    gen = torch.Generator().manual_seed(seed)
    values = []
    kw = {
        "method": method,
        "autocast_dtype": autocast_dtype,
        "reuse_graph": reuse_graph,
        "sdpa_math": sdpa_math,
        "custom_rules": custom_rules,
        "checkpoint": checkpoint,
    }
    with _checking(model, bn_mode, sdpa_math), _operator(model, loss_fn, batches, params, **kw) as op:
        for _ in range(n_samples):
            v = [
                (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, _zeros(p).dtype)
                for p in params
            ]
            values.append(float(_dot(op(v), v)))  # sync point: one value per probe
    t = torch.tensor(values, dtype=torch.float64)
    finite = bool(torch.isfinite(t).all())
    std_error = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return TraceResult(float(t.mean()), std_error, len(values), op.samples, finite)
