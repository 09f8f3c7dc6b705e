"""Page faults behind slow CPU ops, each case in its own process.

1. Ops that write a 25 MiB output (the small CNN's first feature map at 512 images): milliseconds
   and minor page faults per call with glibc as it comes, with every block mapped afresh
   (``MALLOC_MMAP_THRESHOLD_=65536``: what glibc does to blocks above its moving threshold) and
   with ``cpu_malloc``'s setting (``scaling_abs._malloc``).
2. The small CNN's 10-product estimate at 512 images (the embedded default's check) with glibc as
   it comes and with ``cpu_malloc``'s setting: seconds and minor page faults of three estimates.

    .venv/bin/python benchmarks/probe_malloc_faults.py > benchmarks/results/probe_malloc_faults_cpu.txt

(A ``torch.profiler`` table is no help here: profiling changes what the allocator does.)
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ops(mode: str) -> None:
    import torch

    from scaling_abs import _malloc

    if mode == "tuned":
        _malloc.tune()
    cl = torch.channels_last
    a = torch.randn(512, 16, 28, 28).contiguous(memory_format=cl)
    b = torch.randn(512, 16, 28, 28).contiguous(memory_format=cl)
    cases = {
        "threshold_backward (ReLU mask)": lambda: torch.ops.aten.threshold_backward(a, b, 0),
        "add": lambda: a + b,
        "zeros [512, 784, 16]": lambda: torch.zeros(512, 784, 16),
    }
    for name, fn in cases.items():
        fn()
        times, before = [], _faults()
        for _ in range(9):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        per_call = (_faults() - before) / 9
        print(f"  {name:32s} {1e3 * sorted(times)[4]:6.2f} ms (median of 9), {per_call:6.0f} faults per call")


def estimates(mode: str) -> None:
    import torch

    from scaling_abs import _malloc, curvature
    from scaling_abs.models import build_model

    if mode == "tuned":
        _malloc.tune()
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=28)
    x, y = torch.rand(512, 1, 28, 28), torch.randint(0, 10, (512,))
    model.train()(x)  # running statistics that are not 0 and 1
    for i in range(3):
        before, start = _faults(), time.perf_counter()
        res = curvature.top_eigenvalue(
            model, curvature.cross_entropy_loss, [(x, y)], max_iter=10, tol=0.0, seed=0
        )
        seconds = time.perf_counter() - start
        print(
            f"  estimate {i + 1}: {seconds:.3f} s, {_faults() - before:7d} faults, eigenvalue {res.eigenvalue:.6g}"
        )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        {"ops": ops, "estimates": estimates}[sys.argv[2]](sys.argv[3])
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    runs = [
        ("ops", "glibc_default", {}),
        ("ops", "every_block_mapped", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
        ("ops", "tuned", {}),
        ("estimates", "glibc_default", {}),
        ("estimates", "tuned", {}),
    ]
    for part, mode, env in runs:
        print(f"== {part}, {mode}", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", part, mode],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        print(out.stdout.rstrip(), flush=True)
        if out.returncode:
            print(out.stderr[-2000:])


if __name__ == "__main__":
    main()
