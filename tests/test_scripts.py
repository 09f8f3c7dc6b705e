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


def _bench_json(tmp_path, script: str, *args: str) -> dict:
    """Run ``benchmarks/<script>`` with ``args`` and ``--out``; the JSON file it wrote."""
    import json
    import sys

    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_rules_benchmark_runs_and_its_rule_sets_agree(tmp_path):
    rows = _bench_json(tmp_path, "bench_rules_ab.py", "--model", "cnn", "--batch", "8", "--rounds", "1")[
        "results"
    ]
    assert [r["rules"] for r in rows] == [
        "pytorch",
        "pytorch_channels_last",
        "ours_conv_bn",
        "ours_no_fold",
        "ours_nchw",
        "ours",
    ]
    values = [r["eigenvalue"] for r in rows]
    assert max(values) - min(values) < 1e-5 * abs(values[0])  # the same Hessian under each rule set


def test_train_layout_benchmark_trains_the_same_in_both_layouts(tmp_path):
    """bench_train_layout.py end to end: NCHW and channels-last training steps give the same losses."""
    args = ("--model", "cnn", "--batch", "8", "--rounds", "2")
    rows = _bench_json(tmp_path, "bench_train_layout.py", *args)["results"]
    assert [r["layout"] for r in rows] == ["nchw", "channels_last"]
    assert len(rows[0]["losses"]) == 3  # a warm-up round and two timed ones, each an SGD step
    for a, b in zip(rows[0]["losses"], rows[1]["losses"]):
        assert abs(a - b) < 1e-5 * abs(a)


def test_hvp_benchmark_rows_agree_with_classic(tmp_path):
    """bench_hvp.py end to end on the small CNN: our estimates (fp32, and checkpointed under bf16)
    against the classic one from the same start vector, and the ratios it prints."""
    what = ["train_step", "eig_ours", "eig_ours_bf16", "eig_ours_segmented_bf16", "eig_classic"]
    args = ("--models", "cnn", "--batch", "16", "--runs", "1", "--measurements", *what)
    data = _bench_json(tmp_path, "bench_hvp.py", *args)
    rows = {r["measurement"]: r for r in data["results"]}
    assert set(rows) == set(what)
    classic = rows["eig_classic"]["value"]
    assert abs(rows["eig_ours"]["value"] - classic) <= 1e-4 * abs(classic)
    bf16, checkpointed_bf16 = rows["eig_ours_bf16"]["value"], rows["eig_ours_segmented_bf16"]["value"]
    assert checkpointed_bf16 == pytest.approx(bf16, rel=1e-3)  # the same bf16 Hessian, in pieces
    assert 1e-5 < abs(checkpointed_bf16 / classic - 1) < 5e-2  # bf16, so not fp32's value
    assert "notes" not in rows["eig_ours_segmented_bf16"]  # no fallback to two reverse passes
    assert any("eig_ours_segmented_bf16" in r and "one training step" in r for r in data["ratios"])


def test_bf16_probe_reads_a_finished_run(tmp_path):
    import json
    import sys

    from scaling_abs.config import load_config
    from scaling_abs.trainer import train

    run = tmp_path / "run"
    cfg = load_config(
        None,
        {
            "epochs": 1,
            "limit_train_samples": 256,
            "batch_size": 64,
            "hessian_every": 128,
            "hessian_samples": 64,
            "hessian_iters": 20,
            "hessian_tol": 0.0,
            "output_dir": str(run),
            "progress": False,
        },
    )
    summary = train(cfg)
    out = tmp_path / "probe.json"
    probe = ROOT / "benchmarks" / "probe_bf16_eigenvalue.py"
    proc = subprocess.run(
        [sys.executable, str(probe), str(run), "--check", "1", "--iters", "20", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    checks = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    checks = [c for c in checks if c["kind"] == "check"]
    assert rows["samples"] == 64 and summary["curvature_checks"] == len(checks) == 2
    assert checks[1]["samples"] == summary["samples"]  # the last check saw the final weights...
    assert rows["eig_fp32"] == pytest.approx(checks[1]["eigenvalue"], rel=1e-5)  # ...and the same batch
    assert 1e-5 < abs(rows["eig_bf16"] / rows["eig_fp32"] - 1) < 2e-2  # bf16, and no sharp point here
    assert rows["eig_bf16_stock_rules"] == pytest.approx(rows["eig_bf16"], rel=1e-2)
    assert rows["min_running_var"] > 0 and rows["max_bn_gain"] > 0
