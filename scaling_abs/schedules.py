"""Batch-size / learning-rate / adversarial-fraction schedules: BL, FB, GG and ABS/ABSA.

One protocol for every strategy (timm's scheduler shape, progress passed in explicitly):

* ``at(epoch) -> StepSettings(batch_size, lr_multiplier, adv_fraction)``: a pure function of
  progress (epochs as a float: samples seen / training-set size) and the adaptive state;
  ``lr_multiplier`` is the whole factor on the base LR, decays included.
* ``observe(eigenvalue) -> bool``: a curvature check's result (adaptive strategies only); True when
  the batch grew.
* ``state_dict()`` / ``load_state_dict()``: only what cannot be recomputed from progress.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scaling_abs.errors import is_whole

LR_RULES = ("linear", "sqrt", "none")
ADV_DECAY_ON = ("growth", "drop")  # when ABSA divides gamma by omega: every growth, or drops only


@dataclass(frozen=True)
class StepSettings:
    batch_size: int
    lr_multiplier: float
    adv_fraction: float


def step_decay(epoch: float, lr_decay: float, lr_decay_epochs: Sequence[float]) -> float:
    """``lr_decay ** (number of milestones <= epoch)``; ``lr_decay=0.2`` divides by 5 at each."""
    return lr_decay ** sum(1 for m in lr_decay_epochs if epoch >= m)


def poly_decay(epoch: float, end_epoch: float, power: float, final: float) -> float:
    """From 1 at epoch 0 to ``final`` at ``end_epoch`` along ``(1 - epoch / end_epoch) ** power``,
    then ``final`` (I2: 0.01 -> 0.0001 quadratically by epoch 60 is ``(60, 2, 0.01)``).

    >>> [round(poly_decay(e, 60, 2, 0.01), 4) for e in (0, 30, 60, 90)]
    [1.0, 0.2575, 0.01, 0.01]
    """
    if epoch >= end_epoch:
        return final
    return final + (1.0 - final) * (1.0 - epoch / end_epoch) ** power


def base_decay(
    epoch: float,
    lr_decay: float,
    lr_decay_epochs: Sequence[float],
    lr_poly: tuple[float, float, float] | None = None,
) -> float:
    """The base schedule's LR factor: polynomial when ``lr_poly = (end_epoch, power, final)`` is
    given, else the step decays."""
    if lr_poly is not None:
        return poly_decay(epoch, *lr_poly)
    return step_decay(epoch, lr_decay, lr_decay_epochs)


def _check_poly(lr_poly: tuple[float, float, float] | None) -> None:
    if lr_poly is None:
        return
    end, power, final = lr_poly
    if not end > 0:
        raise ValueError(f"lr_poly end epoch must be > 0, got {end}")
    if not power > 0:
        raise ValueError(f"lr_poly power must be > 0, got {power}")
    if not 0 <= final <= 1:
        raise ValueError(f"lr_poly final factor must be in [0, 1], got {final}")


def _check_decay(lr_decay: float, lr_decay_epochs: Sequence[float]) -> None:
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
    if list(lr_decay_epochs) != sorted(lr_decay_epochs):
        raise ValueError(f"lr_decay_epochs must be increasing, got {list(lr_decay_epochs)}")


def _check_batch(
    batch_size: int,
    max_batch_size: int | None = None,
    *,
    names: tuple[str, str] = ("batch_size", "max_batch_size"),
) -> None:
    small, large = names
    for name, value in ((small, batch_size), (large, max_batch_size)):
        if value is not None and not is_whole(value, 1):
            raise ValueError(f"{name} must be an integer > 0, got {value!r}")
    if max_batch_size is not None and max_batch_size < batch_size:
        raise ValueError(f"{large} ({max_batch_size}) must be >= {small} ({batch_size})")


class Schedule:
    """Base of every strategy; non-adaptive ones ignore observations."""

    adaptive = False
    wants_checks = False

    def at(self, epoch: float) -> StepSettings:
        raise NotImplementedError

    def observe(self, eigenvalue: float) -> bool:  # noqa: ARG002
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: ARG002
        return None


class ConstantBatch(Schedule):
    """BL: a fixed batch and the base LR with step decays."""

    def __init__(
        self,
        batch_size: int,
        *,
        lr_decay: float = 0.2,
        lr_decay_epochs: Sequence[float] = (),
        lr_poly: tuple[float, float, float] | None = None,
    ):
        _check_batch(batch_size)
        _check_decay(lr_decay, lr_decay_epochs)
        _check_poly(lr_poly)
        self.batch_size, self.lr_decay, self.lr_decay_epochs = batch_size, lr_decay, tuple(lr_decay_epochs)
        self.lr_poly = lr_poly

    def at(self, epoch: float) -> StepSettings:
        factor = base_decay(epoch, self.lr_decay, self.lr_decay_epochs, self.lr_poly)
        return StepSettings(self.batch_size, factor, 0.0)


class LinearScalingWarmup(Schedule):
    """FB (Goyal et al. 2017): train at ``batch_size`` with the LR scaled by ``k = batch_size /
    base_batch_size``, ramped linearly from 1x to kx over ``warmup_epochs``, then BL's decays."""

    def __init__(
        self,
        batch_size: int,
        *,
        base_batch_size: int = 128,
        warmup_epochs: float = 5.0,
        lr_decay: float = 0.2,
        lr_decay_epochs: Sequence[float] = (),
        lr_poly: tuple[float, float, float] | None = None,
    ):
        _check_batch(base_batch_size, batch_size, names=("base_batch_size", "batch_size"))
        _check_decay(lr_decay, lr_decay_epochs)
        _check_poly(lr_poly)
        self.lr_poly = lr_poly
        if not 0 <= warmup_epochs < math.inf:
            raise ValueError(f"warmup_epochs must be a finite number >= 0, got {warmup_epochs}")
        self.batch_size, self.base_batch_size, self.warmup_epochs = batch_size, base_batch_size, warmup_epochs
        self.lr_decay, self.lr_decay_epochs = lr_decay, tuple(lr_decay_epochs)

    def at(self, epoch: float) -> StepSettings:
        k = self.batch_size / self.base_batch_size
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            k = 1.0 + (k - 1.0) * epoch / self.warmup_epochs
        factor = base_decay(epoch, self.lr_decay, self.lr_decay_epochs, self.lr_poly)
        return StepSettings(self.batch_size, k * factor, 0.0)


class IncreaseBatch(Schedule):
    """GG (Smith et al. 2017): where BL would multiply the LR by a factor ``f < 1``, multiply the batch
    by ``1 / f`` instead, up to ``max_batch_size``. The batch is kept a multiple of the initial one (so
    it still splits over micro-batches and processes); whatever part of the factor the rounding and
    the cap leave goes into the LR, so the noise scale ``lr * N / B`` follows BL's. With a polynomial
    base schedule (``lr_poly``) the batch grows step by step as the polynomial falls.

    >>> s = IncreaseBatch(128, 4096, lr_decay=0.2, lr_decay_epochs=[5, 10, 15])
    >>> [(s.at(e).batch_size, round(s.at(e).lr_multiplier, 4)) for e in (0, 5, 10, 15)]
    [(128, 1.0), (640, 1.0), (3200, 1.0), (4096, 0.256)]
    """

    def __init__(
        self,
        batch_size: int,
        max_batch_size: int,
        *,
        lr_decay: float = 0.2,
        lr_decay_epochs: Sequence[float] = (),
        lr_poly: tuple[float, float, float] | None = None,
    ):
        _check_batch(batch_size, max_batch_size)
        _check_decay(lr_decay, lr_decay_epochs)
        _check_poly(lr_poly)
        self.batch_size, self.max_batch_size = batch_size, max_batch_size
        self.lr_decay, self.lr_decay_epochs, self.lr_poly = lr_decay, tuple(lr_decay_epochs), lr_poly

    def at(self, epoch: float) -> StepSettings:
        factor = base_decay(epoch, self.lr_decay, self.lr_decay_epochs, self.lr_poly)
        if factor <= 0:  # a polynomial that ends at 0: the batch is capped, the LR goes to 0
            return StepSettings(self.max_batch_size, 0.0, 0.0)
        wanted = self.batch_size / factor
        multiple = max(1, math.floor(wanted / self.batch_size + 1e-9))  # 1e-9: 128 / 0.2 is 640.0000001
        batch = min(multiple * self.batch_size, self.max_batch_size)
        return StepSettings(batch, batch / wanted, 0.0)


class AdaptiveBatchSize(Schedule):
    """ABS / ABSA controller (Algorithm 1, with the original code's reading in DESIGN.md).

    The first eigenvalue only sets the reference. A check whose magnitude is ``<= |ref| / alpha`` grows
    the batch by ``beta`` (capped at ``max_batch_size``) and becomes the new reference; every other
    check counts, and ``kappa`` of them in a row grow the batch with the reference unchanged. Each
    growth divides the adversarial fraction by ``adv_decay`` (omega; ``adv_decay_on="drop"``: only a
    growth by a drop does, as Algorithm 1's line 12 has it, and a growth by ``kappa`` keeps it); at
    ``max_batch_size`` it is 0 and checks stop (``wants_checks`` is False). Non-finite eigenvalues
    are ignored.

    >>> s = AdaptiveBatchSize(128, 1024, kappa=2, adv_fraction=0.2)
    >>> [(s.observe(e), s.batch_size) for e in (10.0, 6.0, 4.9, 4.0, 4.0, 1.0)]
    [(False, 128), (False, 128), (True, 256), (False, 256), (True, 512), (True, 1024)]
    >>> s.lr_scale, s.adv_fraction, s.wants_checks
    (8.0, 0.0, False)
    """

    adaptive = True

    def __init__(
        self,
        batch_size: int,
        max_batch_size: int,
        *,
        alpha: float = 2.0,
        beta: float = 2,
        kappa: int = 10,
        adv_fraction: float = 0.0,
        adv_decay: float = 2.0,
        adv_decay_on: str = "growth",
        lr_scaling: str = "linear",
        lr_decay: float = 1.0,
        lr_decay_epochs: Sequence[float] = (),
        adv_stop_epoch: float | None = None,
        lr_poly: tuple[float, float, float] | None = None,
        multiple_of: int = 1,
    ):
        _check_batch(batch_size, max_batch_size)
        _check_decay(lr_decay, lr_decay_epochs)
        _check_poly(lr_poly)
        self.lr_poly = lr_poly
        if not is_whole(multiple_of, 1):
            raise ValueError(f"multiple_of must be an integer >= 1, got {multiple_of!r}")
        if batch_size % multiple_of or max_batch_size % multiple_of:
            raise ValueError(
                f"batch_size ({batch_size}) and max_batch_size ({max_batch_size}) must be multiples of "
                f"multiple_of ({multiple_of})"
            )
        self.multiple_of = multiple_of
        # written so that NaN fails too
        if not 1 < alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 1, got {alpha}")
        if not 1 < beta < math.inf:
            raise ValueError(f"beta must be a finite number > 1, got {beta}")
        if not 1 <= kappa < math.inf:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        if not 0 <= adv_fraction <= 1:
            raise ValueError(f"adv_fraction must be in [0, 1], got {adv_fraction}")
        if not 1 <= adv_decay < math.inf:
            raise ValueError(f"adv_decay must be a finite number >= 1, got {adv_decay}")
        if adv_decay_on not in ADV_DECAY_ON:
            raise ValueError(f"adv_decay_on must be one of {ADV_DECAY_ON}, got {adv_decay_on!r}")
        if lr_scaling not in LR_RULES:
            raise ValueError(f"lr_scaling must be one of {LR_RULES}, got {lr_scaling!r}")
        self.adv_decay_on = adv_decay_on
        self.initial_batch_size, self.max_batch_size = batch_size, max_batch_size
        self.alpha, self.beta, self.kappa = alpha, beta, kappa
        self.adv_decay, self.lr_scaling = adv_decay, lr_scaling
        self.lr_decay, self.lr_decay_epochs, self.adv_stop_epoch = (
            lr_decay,
            tuple(lr_decay_epochs),
            adv_stop_epoch,
        )
        # the state: what cannot be recomputed from progress
        self.batch_size = batch_size
        self.reference: float | None = None
        self.checks_without_growth = 0
        self.adv_fraction = adv_fraction if batch_size < max_batch_size else 0.0
        self.growths = 0

    @property
    def lr_scale(self) -> float:
        ratio = self.batch_size / self.initial_batch_size
        return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[self.lr_scaling]

    @property
    def wants_checks(self) -> bool:  # type: ignore[override]
        return self.batch_size < self.max_batch_size

    def _grow(self, by_drop: bool) -> None:
        # at least one sample more (a beta close to 1 would otherwise round back to the same batch),
        # rounded up to a multiple of multiple_of (the process count: each takes an equal share)
        grown = max(int(round(self.batch_size * self.beta)), self.batch_size + 1)
        grown = -(-grown // self.multiple_of) * self.multiple_of
        self.batch_size = min(grown, self.max_batch_size)
        if self.batch_size >= self.max_batch_size:
            self.adv_fraction = 0.0
        elif by_drop or self.adv_decay_on == "growth":
            self.adv_fraction /= self.adv_decay
        self.checks_without_growth = 0
        self.growths += 1

    def observe(self, eigenvalue: float) -> bool:
        if not self.wants_checks or not math.isfinite(eigenvalue):
            return False
        if self.reference is None:
            self.reference = eigenvalue
            return False
        # magnitudes: the estimate is the largest-magnitude eigenvalue, which can be negative
        if abs(eigenvalue) <= abs(self.reference) / self.alpha:
            self.reference = eigenvalue
            self._grow(by_drop=True)
            return True
        self.checks_without_growth += 1
        if self.checks_without_growth >= self.kappa:
            self._grow(by_drop=False)
            return True
        return False

    def too_few_checks(self, checks: int, longest_every: int) -> str | None:
        """The warning for a run whose checks before its last step (``checks``; a check at the last
        step changes nothing) cannot reach kappa: the first sets the reference and ``kappa`` more
        without a drop grow the batch, so with fewer it grows only if an estimate falls to
        ``1/alpha`` of the first, and with one or none never. ``longest_every``: the longest check
        interval in samples that gives kappa + 1 checks (0: the run has too few steps for them).
        None when kappa can grow the batch."""
        if checks > self.kappa or not self.wants_checks:
            return None
        effect = (
            "the batch cannot grow"
            if checks < 2
            else "the batch grows only if an estimate drops to 1/alpha of the first"
        )
        enough = (
            f"hessian_every <= {longest_every} would make {self.kappa + 1}"
            if longest_every > 0
            else f"the run has too few steps for {self.kappa + 1}"
        )
        return (
            f"{checks} curvature check{'' if checks == 1 else 's'} before the last step, and "
            f"kappa={self.kappa} grows the batch at check {self.kappa + 1}: {effect} ({enough})"
        )

    def at(self, epoch: float) -> StepSettings:
        adv = self.adv_fraction
        if self.adv_stop_epoch is not None and epoch >= self.adv_stop_epoch:
            adv = 0.0
        return StepSettings(
            self.batch_size,
            base_decay(epoch, self.lr_decay, self.lr_decay_epochs, self.lr_poly) * self.lr_scale,
            adv,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "reference": self.reference,
            "checks_without_growth": self.checks_without_growth,
            "adv_fraction": self.adv_fraction,
            "growths": self.growths,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.initial_batch_size <= int(state["batch_size"]) <= self.max_batch_size:
            raise ValueError(
                f"schedule state_dict: batch_size {state['batch_size']} is outside this schedule's "
                f"[{self.initial_batch_size}, {self.max_batch_size}]"
            )
        self.batch_size = int(state["batch_size"])
        self.reference = state["reference"]
        self.checks_without_growth = int(state["checks_without_growth"])
        self.adv_fraction = float(state["adv_fraction"])
        self.growths = int(state["growths"])


STRATEGIES = ("bl", "fb", "gg", "abs", "absa")


def checks_before_last_step(total_samples: int, batch: int, check_every: int) -> int:
    """How many curvature checks a run of ``total_samples`` at a fixed ``batch`` makes before its
    last step: the trainer checks at the first step boundary at or past each multiple of
    ``check_every``, at most once a step, and a check at the last step changes nothing.

    >>> checks_before_last_step(480_000, 128, 60_000), checks_before_last_step(480_000, 128, 15_000)
    (7, 31)
    >>> checks_before_last_step(1000, 100, 10)  # one a step, the 9 before the last
    9
    """
    last_start = (math.ceil(total_samples / batch) - 1) * batch
    return last_start // max(check_every, batch)


def build_schedule(
    strategy: str,
    *,
    batch_size: int,
    max_batch_size: int,
    base_batch_size: int | None = None,
    lr_decay: float = 0.2,
    lr_decay_epochs: Sequence[float] = (),
    warmup_epochs: float = 5.0,
    alpha: float = 2.0,
    beta: float = 2,
    kappa: int = 10,
    adv_fraction: float = 0.2,
    adv_decay: float = 2.0,
    adv_decay_on: str = "growth",
    adv_stop_epoch: float | None = None,
    lr_scaling: str = "linear",
    lr_poly: tuple[float, float, float] | None = None,
    multiple_of: int = 1,
) -> Schedule:
    """The strategy by name. FB trains at ``max_batch_size`` with ``batch_size`` as the LR's
    reference batch; ABS is ABSA with no adversarial examples. ``lr_poly`` replaces the step decays
    with a polynomial one. ``multiple_of``: ABS's grown batches stay multiples of it (the process
    count; GG's are multiples of the initial batch already)."""
    if strategy == "bl":
        return ConstantBatch(batch_size, lr_decay=lr_decay, lr_decay_epochs=lr_decay_epochs, lr_poly=lr_poly)
    if strategy == "fb":
        return LinearScalingWarmup(
            max_batch_size,
            base_batch_size=base_batch_size or batch_size,
            warmup_epochs=warmup_epochs,
            lr_decay=lr_decay,
            lr_decay_epochs=lr_decay_epochs,
            lr_poly=lr_poly,
        )
    if strategy == "gg":
        return IncreaseBatch(
            batch_size, max_batch_size, lr_decay=lr_decay, lr_decay_epochs=lr_decay_epochs, lr_poly=lr_poly
        )
    if strategy in ("abs", "absa"):
        return AdaptiveBatchSize(
            batch_size,
            max_batch_size,
            alpha=alpha,
            beta=beta,
            kappa=kappa,
            adv_fraction=adv_fraction if strategy == "absa" else 0.0,
            adv_decay=adv_decay,
            adv_decay_on=adv_decay_on,
            lr_scaling=lr_scaling,
            lr_decay=lr_decay,
            lr_decay_epochs=lr_decay_epochs,
            adv_stop_epoch=adv_stop_epoch,
            lr_poly=lr_poly,
            multiple_of=multiple_of,
        )
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
