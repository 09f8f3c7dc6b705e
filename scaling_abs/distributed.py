"""The one distributed seam: every collective goes through here.

Each helper is a no-op when no process group is initialised, so one code path serves one process
and many (torchtitan's ``dist_mean(x, mesh=None)`` idea).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``tensors`` across ranks in place (one flat all-reduce); returns them."""
    if not is_distributed() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    return tensors


def average_buffers_(module: torch.nn.Module) -> None:
    """Average ``module``'s floating-point buffers (BatchNorm's running statistics) across ranks, in
    place. Each rank updates them from its own micro-batches; DDP copies rank 0's at its next
    forward only and DeepSpeed never, so FGSM, checks and evaluation (all in eval mode) saw a
    different model on each rank."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        if b.is_floating_point():
            by_dtype.setdefault(b.dtype, []).append(b)
    for buffers in by_dtype.values():
        for b in all_reduce_sum_(buffers):
            b.div_(dist.get_world_size())


def all_reduce_sum(x: float | torch.Tensor) -> float | torch.Tensor:
    """Sum a scalar (float or 0-d tensor) across ranks; returns the same kind it was given."""
    if not is_distributed():
        return x
    t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t if isinstance(x, torch.Tensor) else float(t)


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` (used for decisions every rank must share)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def free_port() -> int:
    """A free TCP port on the loopback address, for a one-process group's MASTER_PORT."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
