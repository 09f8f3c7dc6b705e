"""FGSM examples and ABSA's gamma-fraction mix (paper Section 3.1, Goodfellow et al. 2014).

FGSM runs under whatever autocast the caller has entered (the training forward's; under fp16 with
its loss scaled, see :data:`FP16_FGSM_SCALE`), with the model
in eval mode so BatchNorm statistics are not polluted, and leaves the model as it found it: modes,
buffers and ``.grad``s (only the input's gradient is taken, with ``torch.autograd.grad``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scaling_abs.curvature import preserved_modes


def fgsm(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    eps: float,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """``clamp(x + eps * sign(grad_x loss(model(x), y)), *bounds)``, detached, in ``inputs.dtype``.

    Args:
        model: the classifier; evaluated in eval mode, every module's mode restored afterwards.
        inputs: ``(B, ...)`` inputs in ``bounds`` (the paper's eps = 0.005 is for inputs in [0, 1]).
        targets: ``(B,)`` labels.
        eps: step size, >= 0.
        bounds: the data range ``(low, high)``, ``low < high``; the result is clamped to it.
    """
    _check_step(eps, bounds)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("fgsm needs the input's gradient: call it outside torch.inference_mode()")
    if eps == 0:
        return inputs.detach().clone()
    x = inputs.detach().clone().requires_grad_(True)
    with preserved_modes(model), torch.enable_grad():
        model.eval()
        grad = _input_gradient(model, x, targets, loss)
    adv = x.detach() + eps * grad.sign()
    return adv.clamp_(bounds[0], bounds[1]).to(inputs.dtype)


FP16_FGSM_SCALE = 1024.0
"""Under fp16 autocast the loss is multiplied by this and the batch size before the input's
gradient is taken: a well-classified example's gradient underflowed to exactly 0 in fp16, so its
sign, and its perturbation, were 0 (a third to a half of the rows of a trained CNN). The sign does
not change with a positive scale; an overflow falls back to an fp32 forward and backward."""


def _input_gradient(model, x, targets, loss) -> torch.Tensor:
    device = x.device.type
    fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    scale = FP16_FGSM_SCALE * len(x) if fp16 else 1.0
    (grad,) = torch.autograd.grad(loss(model(x), targets) * scale, x)
    if fp16 and not bool(torch.isfinite(grad).all()):  # sync point, fp16 only
        with torch.autocast(device, enabled=False):
            (grad,) = torch.autograd.grad(loss(model(x), targets), x)
    return grad


def _check_step(eps: float, bounds: tuple[float, float]) -> None:
    if not 0 <= eps < math.inf:  # NaN fails too
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")


def adversarial_count(n: int, fraction: float) -> int:
    """``ceil(fraction * n)`` rows, robust to float fuzz (``ceil(0.2 * 10) == 2``)."""
    return min(n, math.ceil(fraction * n - 1e-9)) if fraction > 0 else 0


def adversarial_rows(global_batch: int, fraction: float, offset: int, size: int) -> torch.Tensor:
    """Which of the ``size`` rows from position ``offset`` of a global batch of ``global_batch``
    samples are adversarial (indices into those rows): the batch's
    ``k = adversarial_count(global_batch, fraction)`` rows, evenly spaced over it (position ``p`` is
    one when ``ceil((p + 1) k / B) > ceil(p k / B)``). A row's fate depends on its position in the
    global batch only, so however the batch is cut into micro-batches and processes, the same
    samples are perturbed, exactly ``k`` of them, and each piece gets its share of the FGSM work.
    (The batch is a random draw, so these rows are as random as Algorithm 1's first ``B*gamma``.)

    >>> adversarial_rows(10, 0.2, 0, 10).tolist(), adversarial_rows(10, 0.2, 4, 6).tolist()
    ([0, 5], [1])
    """
    if not 0 <= offset <= offset + size <= global_batch:
        raise ValueError(f"rows [{offset}, {offset + size}) are not inside a global batch of {global_batch}")
    k = adversarial_count(global_batch, fraction)
    position = torch.arange(offset, offset + size + 1)
    before = -(-position * k // global_batch)  # adversarial rows in [0, position): ceil(p k / B)
    return torch.nonzero(before[1:] > before[:-1]).flatten()


def mix_adversarial(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    fraction: float,
    eps: float,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    global_batch: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """A new batch whose ``ceil(fraction * B)`` rows at evenly spaced positions are their FGSM
    versions (Algorithm 1, line 5: ``x[:B*gamma] = adversarial(x[:B*gamma])``, on a randomly drawn
    batch); the other rows are unchanged. When no row is replaced (``fraction`` 0) it is ``inputs``
    itself, not a copy.

    ``inputs`` may be one micro-batch of a larger global batch (accumulation, several processes):
    pass ``global_batch`` (its size) and ``offset`` (the position of ``inputs``' first row in it),
    and the micro-batch replaces its rows of :func:`adversarial_rows`: the global batch then holds
    ``ceil(fraction * global_batch)`` adversarial rows, the same ones however it is split (each
    micro-batch rounding up on its own gave up to half of every batch at a fraction of 0.2 on many
    processes, and a different run for each split).
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    _check_step(eps, bounds)
    n = inputs.shape[0]
    rows = adversarial_rows(n if global_batch is None else global_batch, fraction, offset, n)
    if rows.numel() == 0:
        return inputs
    rows = rows.to(inputs.device)
    out = inputs.clone()
    out[rows] = fgsm(model, inputs[rows], targets[rows], eps, bounds=bounds, loss=loss)
    return out
