"""How a global batch is realised, and the data order it is drawn from.

The algorithm talks about the global batch ``B``; the planner turns it into
``micro x accumulation x world`` (DESIGN.md). The data order is a seeded permutation per epoch,
consumed sample by sample, so the batch can grow mid-epoch and a run resumes exactly from the
number of samples it has consumed: no sampler state beyond that count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from scaling_abs.errors import is_whole


@dataclass(frozen=True)
class Plan:
    """One optimizer step: ``world`` processes each run ``accumulation`` micro-batches of ``micro``."""

    global_batch: int
    micro: int
    accumulation: int
    world: int

    @property
    def per_rank(self) -> int:
        return self.micro * self.accumulation


def make_plan(global_batch: int, micro_batch_size: int, world_size: int = 1) -> Plan:
    """Split ``global_batch`` evenly over ``world_size`` processes, and each process's share into the
    fewest equal micro-batches of at most ``micro_batch_size``. A share that ``micro_batch_size`` does
    not divide (GG's 640 with micro-batches of 512, a growth by a non-integer ``beta``) gets smaller
    equal micro-batches, so every sample weighs the same: 640 -> 2 x 320.

    >>> make_plan(1024, 256, 2)
    Plan(global_batch=1024, micro=256, accumulation=2, world=2)
    >>> make_plan(128, 256, 2)
    Plan(global_batch=128, micro=64, accumulation=1, world=2)
    >>> make_plan(640, 512, 1)
    Plan(global_batch=640, micro=320, accumulation=2, world=1)
    """
    for name, value in (
        ("global_batch", global_batch),
        ("micro_batch_size", micro_batch_size),
        ("world_size", world_size),
    ):
        if not is_whole(value, 1):
            raise ValueError(f"make_plan: {name} must be an integer > 0, got {value!r}")
    if global_batch % world_size:
        raise ValueError(f"batch_size {global_batch} is not divisible by {world_size} processes")
    per_rank = global_batch // world_size
    accumulation = -(-per_rank // micro_batch_size)  # ceil: the fewest micro-batches that fit
    while per_rank % accumulation:
        accumulation += 1
    return Plan(global_batch, per_rank // accumulation, accumulation, world_size)


def small_micro_batches(plan: Plan, micro_batch_size: int) -> str | None:
    """A warning when equal micro-batches forced a split far finer than ``micro_batch_size`` allows
    (a share with no divisor near it: 127 -> 127 micro-batches of 1), else None.

    >>> small_micro_batches(make_plan(127, 64), 64)[:58]
    'batch 127 runs as 127 micro-batches of 1 on each process: '
    >>> small_micro_batches(make_plan(640, 512), 512) is None
    True
    """
    per_rank = plan.micro * plan.accumulation
    if plan.micro * 4 > min(per_rank, micro_batch_size):
        return None
    return (
        f"batch {plan.global_batch} runs as {plan.accumulation} micro-batches of {plan.micro} on each "
        f"process: micro-batches are equal (every sample weighs the same) and {per_rank} has no divisor "
        f"near micro_batch_size={micro_batch_size}; a batch size with one (a multiple of a power of 2) "
        "runs much faster"
    )


class SampleOrder:
    """The training order: epoch ``e`` is ``randperm(num_samples)`` from a generator seeded with
    ``seed + e``; the stream of all epochs is read by absolute sample position.

    Stateless apart from its arguments, so ``state`` is just the consumed-sample count the trainer
    keeps; a resumed run recomputes the same indices.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        if num_samples <= 0:
            raise ValueError(f"SampleOrder: num_samples must be > 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self._cache: tuple[int, torch.Tensor] | None = None

    def _epoch(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._cache = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._cache[1]

    def indices(self, start: int, count: int) -> list[int]:
        """Sample indices at stream positions ``[start, start + count)``, across epoch boundaries."""
        if start < 0 or count < 0:
            raise ValueError(f"SampleOrder.indices: start and count must be >= 0, got {start}, {count}")
        out: list[int] = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count - len(out), self.num_samples - offset)
            out.extend(self._epoch(epoch)[offset : offset + take].tolist())
            pos += take
        return out


class MicroBatch(list):
    """A micro-batch's sample indices, and ``seed``: the seed of its random augmentation, a function
    of the run's seed and the micro-batch's place in the sample stream (not of how many loaders came
    before it), so a resumed run crops and flips exactly as the uninterrupted one did."""

    seed: int = 0


class MicroBatchSampler:
    """``batch_sampler`` for a DataLoader: this rank's micro-batches of consecutive optimizer steps
    under one plan, starting at stream position ``start``.

    Each global batch ``order[start + s*B : start + (s+1)*B]`` is cut into ``world`` contiguous
    shares (rank ``r`` takes the r-th) and each share into ``accumulation`` micro-batches, so the
    union over ranks of one step is exactly the global batch, whatever the process count. The
    trainer builds a new one whenever the plan changes (at an optimizer-step boundary).
    """

    def __init__(self, order: SampleOrder, plan: Plan, start: int, rank: int = 0):
        if not 0 <= rank < plan.world:
            raise ValueError(f"MicroBatchSampler: rank must be in [0, {plan.world}), got {rank}")
        self.order, self.plan, self.start, self.rank = order, plan, start, rank

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        p = self.plan
        while True:
            batch = self.order.indices(pos, p.global_batch)
            share = batch[self.rank * p.per_rank : (self.rank + 1) * p.per_rank]
            for j in range(p.accumulation):
                micro = MicroBatch(share[j * p.micro : (j + 1) * p.micro])
                # its first sample's stream position names it (an explicit mix, not hash(), whose
                # value for tuples is CPython's to change)
                first = pos + self.rank * p.per_rank + j * p.micro
                micro.seed = (self.order.seed * 0x9E3779B97F4A7C15 + first) % 2**63
                yield micro
            pos += p.global_batch
