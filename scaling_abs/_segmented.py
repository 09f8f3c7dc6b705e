"""Checkpointed Hessian-vector products: the model as a chain of pieces, recomputed piece by piece.

Why not ``torch.utils.checkpoint``: a second backward keeps the recomputed activations in the
gradient's graph, so checkpointing a model and differentiating its gradient twice saves nothing
(measured: 2.56x a training step's memory on an H200 with every ResNet block checkpointed, 2.38x
without). Here the HVP itself is split along the chain ``x_k = f_k(x_{k-1}, w_k)``, ``L = loss(x_K)``
(Pearlmutter's R-operator, forward-over-reverse, one piece at a time):

1. forward, no graph: the pieces' inputs ``x_{k-1}`` and their directional derivatives
   ``xdot_{k-1}`` along ``v`` (forward-mode AD), kept at the cuts only;
2. backward, piece by piece from the loss: with ``g_k = dL/dx_k`` and ``gdot_k`` its derivative
   along ``v``, one double backward of the piece gives both the next pair and the piece's part of
   ``H v``: ``grad(<g_k, f_k>) = (g_{k-1}, dL/dw_k)`` and
   ``grad(<grad(<g_k, f_k>), (xdot_{k-1}, v_k)> + <gdot_k, f_k>) = (gdot_{k-1}, (H v)_k)``
   (the Hessian of the scalar ``<g_k, f_k>`` in ``(x, w)`` is symmetric, so this reverse pass is
   the forward-mode derivative the R-operator asks for).

Peak memory: the cuts (two tensors each) plus one piece's second-order graph, instead of the whole
model's. The cuts are chosen from the pieces' measured output sizes (:func:`plan`). Cost: about one
more forward (the tangents) and one recomputed forward per product than a fresh double backward.
Exact: the same ``H v`` up to rounding (tests against dense Hessians in fp64).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Unit = Callable[[torch.Tensor], torch.Tensor]
# A piece's second-order graph against its forward activations: a fresh double backward of the
# whole model took 2.4-3.2x a training step's memory (benchmarks/README.md, "On a GPU" and the CPU table).
GRAPH_FACTOR = 3.0


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp32 for half types and fp32, fp64 stays fp64 (curvature's too)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _first(batch: Any) -> torch.Tensor:
    return batch[0]


def _cross_entropy_head(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.cross_entropy(_acc(logits), batch[1])


@dataclass
class Chain:
    """A model as ``loss(units[-1](...units[0](inputs(batch))), batch)``: what a checkpointed HVP
    recomputes piece by piece. ``units`` are modules or parameter-free callables, each mapping one
    tensor to one tensor; consecutive units are grouped into pieces by :func:`plan`.

    ``inputs(batch)`` (default ``batch[0]``) and ``loss(output, batch)`` (default the cross-entropy
    against ``batch[1]``, computed in fp32) must describe the same loss as the ``loss_fn`` it stands for.
    ``cuts``: the units that start a piece (default: planned from measured sizes, see :func:`plan`).
    ``model``: when given, the first product for each input shape checks that the units compute
    ``model(inputs(batch))`` (in eval mode) and raises ValueError where they do not.
    """

    units: list[Unit]
    loss: Callable[[torch.Tensor, Any], torch.Tensor] = _cross_entropy_head
    inputs: Callable[[Any], torch.Tensor] = _first
    cuts: list[int] | None = None
    model: nn.Module | None = field(default=None, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.units = list(self.units)
        if not self.units:
            raise ValueError("Chain: no units")
        if self.cuts is not None:
            cuts = list(self.cuts)
            if not cuts or cuts[0] != 0 or cuts != sorted(set(cuts)) or cuts[-1] >= len(self.units):
                raise ValueError(f"Chain: cuts must rise from 0 and stay below {len(self.units)}, got {cuts}")
            self.cuts = cuts


class _Normalize(nn.Module):
    """The input normalisation of :class:`scaling_abs.models.Normalized` as a unit of its own."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.owner = [owner]  # a list: not a submodule, so its parameters are not counted twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner[0].normalize(x)


class _Embeddings(nn.Module):
    """A transformers ViT's embeddings as a unit (the pixels cast as ``ViTModel`` casts them)."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeddings(x.to(self.embeddings.patch_embeddings.projection.weight.dtype))


class _FirstToken(nn.Module):
    """``classifier(h[:, 0])``: the class token's head."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h[:, 0, :])


def _vit_units(net: nn.Module) -> list[Unit] | None:
    """transformers' ``ViTForImageClassification`` (5.x: ``vit.layers``; 4.x: ``vit.encoder.layer``)."""
    if type(net).__name__ != "ViTForImageClassification":
        return None
    vit = net.vit
    layers = getattr(vit, "layers", None)
    if layers is None:
        layers = getattr(getattr(vit, "encoder", None), "layer", None)
    if layers is None:
        return None
    return [_Embeddings(vit.embeddings), *layers, vit.layernorm, _FirstToken(net.classifier)]


def _resnet_units(net: nn.Module) -> list[Unit]:
    units: list[Unit] = [net.conv1, net.bn1, net.relu, net.maxpool]
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        units.extend(layer)
    return [*units, net.avgpool, nn.Flatten(1), net.fc]


def units_of(model: nn.Module) -> list[Unit] | None:
    """The chain of ``model``'s forward, or None where it is not known: ``nn.Sequential`` (nested
    ones flattened), torchvision's ResNet and AlexNet, transformers' ViT image classifier (as the zoo wraps it),
    :class:`~scaling_abs.models.Normalized` around any of them, and any module with a
    ``hessian_units()`` method returning the list."""
    from scaling_abs.models import Normalized
    from scaling_abs.models.vision import _LogitsOnly

    own = getattr(model, "hessian_units", None)
    if callable(own):
        return list(own())
    if isinstance(model, _LogitsOnly):
        return _vit_units(model.net)
    if isinstance(model, Normalized):
        inner = units_of(model.model)
        return None if inner is None else [_Normalize(model), *inner]
    if type(model) is nn.Sequential:
        units: list[Unit] = []
        for child in model:
            inner = units_of(child)
            units.extend(inner if inner else [child])
        return units
    try:
        from torchvision.models import AlexNet, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if type(model) is ResNet:  # not a subclass: its forward may differ
        return _resnet_units(model)
    if type(model) is AlexNet:
        return [*model.features, model.avgpool, nn.Flatten(1), *model.classifier]
    return None


# model -> (ids of its modules, its chains' plans): calls with checkpoint=True plan and check once
# per model and input shape, until the model's modules change. Weak keys; the values hold no module.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chain(model: nn.Module) -> Chain:
    """:class:`Chain` of ``model`` for ``curvature.cross_entropy_loss`` (see :func:`units_of`);
    chains of the same model share their plans (and checks) while its modules stay the same."""
    units = units_of(model)
    if not units:
        raise ValueError(
            f"checkpoint: cannot split {type(model).__name__} into a chain of pieces (known: "
            "nn.Sequential, torchvision ResNet / AlexNet, transformers ViT, or a model with a hessian_units() "
            "method); pass curvature.Chain(units=[...]) instead"
        )
    ids = tuple(id(m) for m in model.modules())
    cached = _PLANS.get(model)
    if cached is None or cached[0] != ids:
        cached = _PLANS[model] = (ids, {})
    return Chain(units, model=model, _plans=cached[1])


def plan(outputs: Sequence[int], saved: Sequence[int], factor: float = GRAPH_FACTOR) -> list[int]:
    """Where the pieces start: indices into the units, the first is 0. ``outputs[i]``: bytes of unit
    ``i``'s output; ``saved[i]``: bytes its forward saves for the backward. Minimises the estimated
    peak ``2 * (the kept cuts' outputs) + factor * (the largest piece's saved bytes)``: a cut before
    unit ``i`` keeps unit ``i - 1``'s output and its tangent, and a piece's second-order graph is
    about ``factor`` times what its forward saves (dynamic programming per candidate largest piece)."""
    n = len(outputs)
    prefix = [0]
    for s in saved:
        prefix.append(prefix[-1] + s)
    spans = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})
    if len(spans) > 64:  # a geometric subset keeps long chains quick
        spans = [spans[round(k * (len(spans) - 1) / 63)] for k in range(64)]
    best_cost, best_starts = float("inf"), [0]
    for limit in spans:
        cost = [0.0] + [float("inf")] * n  # cost[j]: kept cuts for units[:j]
        start = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):
                if prefix[j] - prefix[i] > limit:
                    break
                c = cost[i] + (2 * outputs[i - 1] if i > 0 else 0)
                if c < cost[j]:
                    cost[j], start[j] = c, i
        if cost[n] == float("inf"):
            continue
        starts, j = [], n
        while j > 0:
            starts.append(start[j])
            j = start[j]
        starts.reverse()
        largest = max(prefix[b] - prefix[a] for a, b in zip(starts, [*starts[1:], n]))
        total = cost[n] + factor * largest
        if total < best_cost:
            best_cost, best_starts = total, starts
    return best_starts


def _same_dtype_tangent(module: nn.Module, args: Any, out: Any) -> Any:
    """A forward hook for the tangent pass: a dual output whose tangent's dtype differs from its
    value's gets the value's. ``batch_norm``'s forward-mode rule gives a bf16 input an fp32 tangent
    (its fp32 weight and running statistics win the type promotion), and the next convolution
    refuses the mix ("Input type ... and weight type ... should be the same"): every ResNet block
    under autocast fell back to two reverse passes."""
    import torch.autograd.forward_ad as fwad

    if isinstance(out, torch.Tensor):
        value, tangent = fwad.unpack_dual(out)
        if tangent is not None and tangent.dtype != value.dtype:
            return fwad.make_dual(value, tangent.to(value.dtype))
    return None


def _tangents_follow_values() -> torch.utils.hooks.RemovableHandle:
    """``with _tangents_follow_values():`` the hook above on every module (the handle removes it)."""
    return torch.nn.modules.module.register_module_forward_hook(_same_dtype_tangent)


class _TangentAsValue(torch.autograd.Function):
    """Identity for values and gradients whose forward-mode tangent takes the value's dtype: the
    same mend as :func:`_same_dtype_tangent` where the tangent cannot be read (``torch.func.jvp``).
    A copy, not a view: a custom Function returning a view must return a view as its tangent too."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return tangent.to(ctx.dtype)


# Normalisation layers mix dtypes under autocast: BatchNorm keeps a bf16 value with fp32 statistics
# (its forward-mode rule then gives an fp32 tangent), LayerNorm and GroupNorm run in fp32 on a bf16
# input (a bf16 tangent beside an fp32 value).
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _norm_tangent_as_value(module: nn.Module, args: Any, out: Any) -> Any:
    if isinstance(module, _NORMS) and isinstance(out, torch.Tensor):
        return _TangentAsValue.apply(out)
    return None


def norm_tangents_follow_values() -> torch.utils.hooks.RemovableHandle:
    """``with norm_tangents_follow_values():`` for ``torch.func.jvp`` under autocast, normalisation
    layers' outputs get tangents of their values' dtype (a copy of each output)."""
    return torch.nn.modules.module.register_module_forward_hook(_norm_tangent_as_value)


def _tensor(out: Any, unit: Unit) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"checkpoint: unit {type(unit).__name__} returned {type(out).__name__}; units must map one "
            "tensor to one tensor"
        )
    return out


def measure(
    units: Sequence[Unit], x: torch.Tensor, autocast, exclude: set[int]
) -> tuple[list[int], list[int]]:
    """Each unit's output bytes and the bytes its forward saves for the backward (storages counted
    once, ``exclude``: storages not to count, such as the parameters'), one unit's graph at a time."""
    outputs, saved = [], []
    h = x
    for u in units:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen=seen) -> None:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in exclude:
                seen[ptr] = t.untyped_storage().nbytes()
            # Nothing is kept (no backward follows): returning ``t`` itself would tie an output to
            # its own graph (ReLU saves its output), a cycle that kept every unit's graph alive.

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), autocast():
            out = _tensor(u(h.detach().requires_grad_(h.is_floating_point()).clone()), u)
        h = out.detach()
        outputs.append(h.numel() * h.element_size())
        saved.append(sum(seen.values()))
        del out
    return outputs, saved


def _params_of(unit: Unit, wanted: dict[int, int]) -> list[tuple[str, int]]:
    """(name inside the unit, index into the HVP's params) for the unit's parameters in ``wanted``."""
    if not isinstance(unit, nn.Module):
        return []
    return [(n, wanted[id(p)]) for n, p in unit.named_parameters() if id(p) in wanted]


class SegmentedHVP:
    """``H v`` of one micro-batch's loss through a :class:`Chain`, piece by piece (module docstring)."""

    def __init__(self, model: nn.Module, ch: Chain, params: Sequence[torch.Tensor]):
        self.model, self.chain, self.params = model, ch, list(params)
        wanted = {id(p): i for i, p in enumerate(self.params)}
        self.unit_params = [_params_of(u, wanted) for u in ch.units]
        self._by_reverse = False  # forward-mode AD failed once: tangents by two reverse passes
        found = {i for ps in self.unit_params for _, i in ps}
        missing = [i for i in range(len(self.params)) if i not in found]
        if missing:
            names = {id(p): n for n, p in model.named_parameters()}
            listed = ", ".join(names.get(id(self.params[i]), f"#{i}") for i in missing[:5])
            raise ValueError(
                f"checkpoint: {len(missing)} of the Hessian's parameters are in no unit of the chain "
                f"({listed}{', ...' if len(missing) > 5 else ''}; units must be the modules that own them)"
            )

    def _index(self, lo: int, hi: int) -> list[int]:
        """The HVP's parameters used in units ``lo:hi``, each once (a weight shared by two units too)."""
        return list(dict.fromkeys(i for u in range(lo, hi) for _, i in self.unit_params[u]))

    def _rng(self, devices: list[int]):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]

    @staticmethod
    def _set_rng(rng, devices: list[int]) -> None:
        torch.set_rng_state(rng[0])
        for d, state in zip(devices, rng[1]):
            torch.cuda.set_rng_state(state, d)

    def _starts(
        self, x: torch.Tensor, autocast, autocast_dtype, devices: list[int], training: bool
    ) -> list[int]:
        """Where the pieces start; at the first product for a shape, the chain is checked against
        the model (when it has one) and the cuts are planned. Neither draws from the global RNG."""
        key = (tuple(x.shape), x.dtype, x.device.type, autocast_dtype, training)
        starts = self.chain._plans.get(key)
        if starts is None:
            with torch.random.fork_rng(devices=devices):
                checked = self.chain.model is None or self._verify(x, autocast, devices)
                if self.chain.cuts is not None:
                    starts = self.chain.cuts
                else:
                    exclude = {
                        t.untyped_storage().data_ptr()
                        for t in [*self.model.parameters(), *self.model.buffers()]
                    }
                    starts = plan(*measure(self.chain.units, x, autocast, exclude))
            if checked:  # else checked (and planned) again at the next product
                self.chain._plans[key] = starts
        return starts

    def _verify(self, x: torch.Tensor, autocast, devices: list[int]) -> bool:
        """The units must compute the model's forward (in its current modes, dropout masks drawn
        alike): a wrong chain would give a wrong Hessian. False: not checkable on this batch (the
        model's output is not finite), so it is checked again at the next product."""
        model = self.chain.model
        rng = self._rng(devices)
        with torch.no_grad(), autocast():
            want = model(x)
            self._set_rng(rng, devices)
            got = self._run(self.chain.units, x.clone())
        if not bool(torch.isfinite(want).all()):
            return False
        tol = 1e-4 if want.dtype in (torch.float32, torch.float64) else 3e-2
        if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
            raise ValueError(
                f"checkpoint: the chain of {type(model).__name__} does not compute its forward "
                "(a different forward or library version?); pass curvature.Chain(units=[...]) instead"
            )
        return True

    def _run(self, units: Sequence[Unit], h: torch.Tensor) -> torch.Tensor:
        for u in units:
            h = _tensor(u(h), u)
        return h

    def _tangent(self, lo: int, hi: int, x, xdot, vector, autocast, rng, devices):
        """``(f(x), d f(x)[xdot, v])`` of units ``lo:hi``: forward-mode AD, or (where an op has no
        forward-mode rule) the same derivative from two reverse passes. ``rng``:
        the state the piece starts from (None: not in train mode), so a retry draws the same masks."""
        units = self.chain.units[lo:hi]
        if self._by_reverse:
            return self._tangent_by_reverse(lo, hi, x, xdot, vector, autocast)
        try:
            import torch.autograd.forward_ad as fwad
            from torch.func import functional_call

            with torch.no_grad(), fwad.dual_level(), autocast(), _tangents_follow_values():
                # copies: an in-place first op must change neither the kept cut nor its tangent
                h = x.clone() if xdot is None else fwad.make_dual(x.clone(), xdot.to(x.dtype, copy=True))
                for u, ps in zip(units, self.unit_params[lo:hi]):
                    if ps:
                        own = dict(u.named_parameters())
                        duals = {
                            n: fwad.make_dual(own[n].detach(), vector[i].to(own[n].dtype)) for n, i in ps
                        }
                        h = functional_call(u, duals, (h,))
                    else:
                        h = u(h)
                out, tangent = fwad.unpack_dual(_tensor(h, units[-1]))
            if tangent is None:
                tangent = torch.zeros_like(out)
            return out, tangent
        except (RuntimeError, NotImplementedError) as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            self._by_reverse = True  # for the rest of this operator's products: failing costs a forward
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(
                f"checkpointed HVP: forward-mode AD failed ({reason[:200]}); the tangents come from "
                "two reverse passes per piece instead (the same result, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            if rng is not None:
                self._set_rng(rng, devices)
            return self._tangent_by_reverse(lo, hi, x, xdot, vector, autocast)

    def _tangent_by_reverse(self, lo, hi, x, xdot, vector, autocast):
        """The double-vjp trick: ``J u = d/dw <J^T w, u>`` for a dummy cotangent ``w``."""
        index = self._index(lo, hi)
        ps = [self.params[i] for i in index]
        tangents = [vector[i] for i in index]
        xin = x.detach().requires_grad_(xdot is not None)
        with torch.enable_grad(), autocast():
            y = self._run(self.chain.units[lo:hi], xin.clone())
            if not y.requires_grad:  # depends on neither its input nor the block
                return y.detach(), torch.zeros_like(y)
            w = torch.zeros_like(y, requires_grad=True)
            wrt = ([xin] if xdot is not None else []) + ps
            into = ([xdot] if xdot is not None else []) + tangents
            vjps = torch.autograd.grad(y, wrt, w, create_graph=True, allow_unused=True)
            used = [(a, b.to(a.dtype)) for a, b in zip(vjps, into) if a is not None]
            if not used:
                return y.detach(), torch.zeros_like(y)
            (jvp,) = torch.autograd.grad([a for a, _ in used], w, [b for _, b in used], allow_unused=True)
        return y.detach(), torch.zeros_like(y) if jvp is None else jvp.detach()

    def __call__(
        self,
        batch: Any,
        vector: Sequence[torch.Tensor],
        *,
        autocast_dtype: torch.dtype | None,
        rules,
        scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """``(H v)`` as fp32 tensors shaped like ``params``; ``rules`` is a context for the second-order
        passes (our convolution rules), ``autocast_dtype`` that of every forward, ``scale`` the fp16
        loss scale."""
        units = self.chain.units
        x0 = self.chain.inputs(batch)

        def autocast():
            if autocast_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=x0.device.type, dtype=autocast_dtype)

        devices = [x0.device.index or 0] if x0.device.type == "cuda" else []
        training = any(m.training for m in self.model.modules())
        starts = self._starts(x0, autocast, autocast_dtype, devices, training)
        bounds = [*starts, len(units)]
        pieces = list(zip(bounds[:-1], bounds[1:]))
        has = [any(self.unit_params[u] for u in range(lo, hi)) for lo, hi in pieces]
        first = has.index(True)  # below it nothing depends on v
        # forward: each piece's input and its tangent along v (None: zero)
        cuts: list[tuple[torch.Tensor, torch.Tensor | None, Any]] = []
        x, xdot = x0, None
        for k, (lo, hi) in enumerate(pieces):
            rng = self._rng(devices) if training else None
            cuts.append((x, xdot, rng) if k >= first else (None, None, None))
            if k == len(pieces) - 1:
                break
            if k < first:
                with torch.no_grad(), autocast():
                    x = self._run(units[lo:hi], x.clone())
            else:
                x, xdot = self._tangent(lo, hi, x, xdot, vector, autocast, rng, devices)
        # backward, from the loss down to the first piece with parameters
        hv: list[torch.Tensor | None] = [None] * len(self.params)
        g: torch.Tensor | None = None
        gdot: torch.Tensor | None = None
        for k in range(len(pieces) - 1, first - 1, -1):
            lo, hi = pieces[k]
            x, xdot, rng = cuts[k]
            index = self._index(lo, hi)
            need_x = k > first
            xin = x.detach().requires_grad_(need_x)
            wrt = ([xin] if need_x else []) + [self.params[i] for i in index]
            along = ([xdot] if need_x else []) + [vector[i] for i in index]
            with contextlib.ExitStack() as stack:
                if rng is not None:
                    stack.enter_context(torch.random.fork_rng(devices=devices))
                    self._set_rng(rng, devices)
                stack.enter_context(torch.enable_grad())
                stack.enter_context(rules())
                with autocast():
                    y = self._run(units[lo:hi], xin.clone())
                    if k == len(pieces) - 1:
                        y = self.chain.loss(y, batch)
                if not y.requires_grad:  # a piece that depends on neither its input nor the block
                    grads = second = (None,) * len(wrt)
                else:
                    top = torch.full_like(y, scale) if g is None else g.to(y.dtype)
                    grads = torch.autograd.grad(y, wrt, top, create_graph=True, allow_unused=True)
                    terms = [
                        (_acc(a) * _acc(b)).sum()
                        for a, b in zip(grads, along)
                        if a is not None and b is not None
                    ]
                    if gdot is not None:
                        terms.append((_acc(y) * _acc(gdot)).sum())
                    if terms:
                        second = torch.autograd.grad(sum(terms), wrt, allow_unused=True)
                    else:
                        second = (None,) * len(wrt)
            if need_x:
                g = grads[0].detach() if grads[0] is not None else torch.zeros_like(x)
                gdot = second[0] if second[0] is not None else torch.zeros_like(x)
            for i, h in zip(index, second[1 if need_x else 0 :]):
                if h is not None:
                    h = _acc(h)
                    hv[i] = h if hv[i] is None else hv[i] + h
            del grads, second, y
            cuts[k] = (None, None, None)  # this piece's cut is no longer needed
        return [torch.zeros_like(_acc(p)) if h is None else h / scale for p, h in zip(self.params, hv)]
