"""What the training-run benchmarks (``bench_solvers.py``, ``bench_hessian_samples.py``) record
besides their measurements: the command, the config, the machine and the run's outcome."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_record(command: str, overrides: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": command,
        "config": {k: overrides[k] for k in sorted(overrides)},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "git": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip(),
        },
        "training": {
            k: summary[k] for k in ("test_accuracy", "updates", "max_batch_size", "curvature_checks")
        },
    }
