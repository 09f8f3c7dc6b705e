"""Shared by the benchmarks that measure along a training run (``bench_solvers.py``,
``bench_hessian_samples.py``): a timed eigenvalue estimate on the trainer's model, and what a run
records besides its measurements (the command, the config, the machine, the run's outcome)."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from scaling_abs import curvature

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's name and the vector extensions that decide convolution speed (``platform.processor``
    says only "x86_64" on Linux): "AMD EPYC (avx2, no avx512f, no avx512_bf16, no amx_bf16)"."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "flags" in fields:  # x86
        flags, wanted = set(fields["flags"].split()), ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    else:  # Arm lists its extensions as "Features"
        flags, wanted = set(fields.get("Features", "").split()), ("asimd", "sve", "sve2", "bf16")
    ext = ", ".join(f if f in flags else f"no {f}" for f in wanted)
    return f"{fields.get('model name', platform.machine())} ({ext})"


def git_revision() -> str:
    """The short commit hash of the repository the benchmarks run from, for their outputs."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return rev.stdout.strip()


def run_record(command: str, overrides: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": command,
        "config": {k: overrides[k] for k in sorted(overrides)},
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "git": git_revision(),
        },
        "training": {
            k: summary[k] for k in ("test_accuracy", "updates", "max_batch_size", "curvature_checks")
        },
    }


def timed_estimate(trainer, batches, params, **kw) -> tuple[curvature.EigenResult, float]:
    """``top_eigenvalue`` of ``trainer``'s model on ``batches`` with the check's settings (iterations,
    tolerance, seed, BatchNorm mode, precision) unless ``kw`` overrides them, and its seconds."""
    from scaling_abs.trainer import _AUTOCAST, _own_forward

    cfg = trainer.cfg
    args = {
        "max_iter": cfg.hessian_iters,
        "tol": cfg.hessian_tol,
        "seed": cfg.seed + trainer.state.checks,
        "autocast_dtype": _AUTOCAST.get(trainer.check_precision),
    }
    args.update(kw)
    start = time.perf_counter()
    with _own_forward(trainer.raw_model):  # as the trainer's checks: not training's autocast wrapper
        res = curvature.top_eigenvalue(
            trainer.raw_model,
            curvature.cross_entropy_loss,
            batches,
            params=params,
            bn_mode=cfg.hessian_bn_mode,
            **args,
        )
    return res, time.perf_counter() - start
