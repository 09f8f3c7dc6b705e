"""FGSM examples and ABSA's gamma-fraction mix (paper Section 3.1, Goodfellow et al. 2014).

FGSM runs under whatever autocast the caller has entered (the training forward's), with the model
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
        value = loss(model(x), targets)
        (grad,) = torch.autograd.grad(value, x)
    adv = x.detach() + eps * grad.sign()
    return adv.clamp_(bounds[0], bounds[1]).to(inputs.dtype)


def _check_step(eps: float, bounds: tuple[float, float]) -> None:
    if not 0 <= eps < math.inf:  # NaN fails too
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")


def adversarial_count(n: int, fraction: float) -> int:
    """``ceil(fraction * n)`` rows, robust to float fuzz (``ceil(0.2 * 10) == 2``)."""
    return min(n, math.ceil(fraction * n - 1e-9)) if fraction > 0 else 0


def mix_adversarial(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    fraction: float,
    eps: float,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """A new batch whose first ``ceil(fraction * B)`` rows are their FGSM versions (Algorithm 1,
    line 5: ``x[:B*gamma] = adversarial(x[:B*gamma])``); the other rows are unchanged. When no row
    is replaced (``fraction`` 0) it is ``inputs`` itself, not a copy."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    _check_step(eps, bounds)
    k = adversarial_count(inputs.shape[0], fraction)
    if k == 0:
        return inputs
    out = inputs.clone()
    out[:k] = fgsm(model, inputs[:k], targets[:k], eps, bounds=bounds, loss=loss)
    return out
