"""glibc's malloc set for CPU training (scaling_abs._malloc, config key cpu_malloc)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaling_abs import _malloc
from tests.test_trainer import run

ROOT = Path(__file__).resolve().parents[1]
# Four 4-product estimates of the small CNN's Hessian at 512 images; print the fewest and the most
# minor page faults of the third and fourth (the first two settle the heap, which with the setting
# takes a round or two: 37,000 -> 6,000 -> 7 faults in benchmarks/results/probe_malloc_faults_cpu.txt;
# without it glibc's moving mmap threshold makes the count vary, 25,000-110,000 in one estimate).
FAULTS = """
import resource, sys, torch
from scaling_abs import _malloc, curvature
from scaling_abs.models import build_model
tuned = _malloc.tune() if sys.argv[1] == "tune" else False
torch.manual_seed(0)
model = build_model("cnn", num_classes=10, in_channels=1, image_size=28)
batch = [(torch.rand(512, 1, 28, 28), torch.randint(0, 10, (512,)))]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    curvature.top_eigenvalue(model, curvature.cross_entropy_loss, batch, max_iter=4, tol=0.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, min(faults[2:]), max(faults[2:]))
"""

needs_glibc = pytest.mark.skipif(_malloc._glibc() is None, reason="glibc only")


def faults(mode: str) -> tuple[bool, int, int]:
    """(tuned, fewest, most) faults of the third and fourth estimates, in a new process."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@needs_glibc
def test_tuned_malloc_reuses_a_large_freed_block():
    tuned, few, _ = faults("tune")
    untuned, _, many = faults("off")
    assert tuned and not untuned
    # glibc's default maps the 25 MiB feature maps afresh at each product: ~6,000 pages each
    assert many > 10_000, (few, many)
    assert few < many / 10, (few, many)


@needs_glibc
def test_cpu_training_tunes_malloc_unless_told_not_to(tmp_path):
    off, _ = run(tmp_path, "off", strategy="bl", cpu_malloc=False)
    on, _ = run(tmp_path, "on", strategy="bl")
    assert off["cpu_malloc_tuned"] is False and on["cpu_malloc_tuned"] is True
    assert json.loads((tmp_path / "on" / "summary.json").read_text())["cpu_malloc_tuned"] is True
