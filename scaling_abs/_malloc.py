"""glibc's malloc, set for CPU training (config key ``cpu_malloc``).

PyTorch's CPU tensors come straight from ``malloc``. glibc serves a block above its mmap threshold
(adjusted as the program runs, at most 32 MiB) with a fresh mapping and unmaps it when it is
freed, and it returns the top of its heap to the system once more than a threshold is free there.
Either way, the next tensor of that size is faulted in again page by page. Training and curvature
checks free and allocate the same large tensors at every step: the small CNN's 10-product
estimate at 512 images made 210,000-280,000 minor page faults and took 0.75-0.84 s, against 7-37,000
faults and 0.52-0.56 s with this setting; an op writing a 25 MiB output took 6.2-7.4 ms on fresh
pages against 0.3-0.9 ms on reused memory (``benchmarks/probe_malloc_faults.py``). The demo's
checks (``make demo``) took 0.73x the time (benchmarks/README.md, "The CPU's memory allocator").

:func:`tune` turns both off for the rest of the process: no mappings for large blocks (all come
from the heap, where freed blocks are reused) and no trimming. The price is that memory freed
during the run stays with the process until it exits (as a GPU's caching allocator keeps it).
Linux with glibc only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_tuned = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # gnu_get_libc_version exists in glibc only (musl has a mallopt that does nothing)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def tune() -> bool:
    """No mmap for large blocks and no heap trimming, for this process. True when glibc took both
    settings (now or at an earlier call); False where there is no glibc."""
    global _tuned
    if _tuned:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _tuned = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX))
    return _tuned
