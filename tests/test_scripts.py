"""Cluster run scripts: --help, the missing-data error, and the command they would launch; the rules
benchmark runs."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("run_*.sh"))


def sh(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "PRESET", "DEEPSPEED")}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env={**clean, **env})


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_and_missing_data(script):
    helped = sh(script, "--help")
    assert helped.returncode == 0 and "DATA_DIR" in helped.stdout
    missing = sh(script, PRESET="c1")
    assert missing.returncode == 2 and "DATA_DIR" in missing.stderr


def test_i3_multi_node_command():
    proc = sh(
        ROOT / "benchmarks" / "run_imagenet_i3.sh",
        "epochs=1",
        DRY_RUN="1",
        DATA_DIR="/data/imagenet",
        NUM_NODES="2",
        NODE_RANK="1",
        PROCS_PER_NODE="4",
        DEEPSPEED="zero2",
    )
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout
    for part in (
        "--num_machines 2",
        "--machine_rank 1",
        "--num_processes 8",
        "--use_deepspeed",
        "-m scaling_abs train --config i3",
        "data_dir=/data/imagenet",
        "strategy=absa",
        "epochs=1",
    ):
        assert part in cmd, part


def test_rules_benchmark_runs_and_its_rule_sets_agree(tmp_path):
    import json
    import sys

    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_rules_ab.py"), "--model", "cnn"]
    proc = subprocess.run(
        [*cmd, "--batch", "8", "--rounds", "1", "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["rules"] for r in rows] == ["pytorch", "ours_conv_bn", "ours"]
    values = [r["eigenvalue"] for r in rows]
    assert max(values) - min(values) < 1e-5 * abs(values[0])  # the same Hessian under each rule set
