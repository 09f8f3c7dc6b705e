import json
import math
import subprocess
import sys

import pytest

from scaling_abs.errors import UserError
from scaling_abs.simulate import main, paper_table3, ring_allreduce_time, simulate_from_run, updates_for


def test_ring_formula():
    assert ring_allreduce_time(1000, 1) == 0.0
    # 2 (alpha log2 p + (p-1)/p |theta| beta): p = 4, 1e6 bits at 1e9 b/s, alpha = 1e-6
    got = ring_allreduce_time(1_000_000 // 32, 4, latency_s=1e-6, bandwidth_bits_per_s=1e9)
    assert got == pytest.approx(2 * (1e-6 * 2 + 0.75 * (1_000_000 // 32 * 32) / 1e9))


def test_updates_for_segments():
    assert updates_for(1000, [(2, 100)]) == 20
    assert updates_for(1001, [(1, 100), (1, 1000)]) == 11 + 2


def test_table3_within_5_percent_of_the_paper():
    rows = {r.method: r for r in paper_table3()}
    for method, paper in {"BL": 16666, "GG": 6150, "ABS": 2666, "ABSA": 3467}.items():
        assert abs(rows[method].total_s / paper - 1) < 0.05, method
    for method, paper in {"GG": 2.71, "ABS": 6.25, "ABSA": 4.80}.items():
        assert abs(rows[method].speedup / paper - 1) < 0.05, method


def _fake_run(tmp_path):
    steps = [{"kind": "step", "batch_size": b, "step_time_s": 0.001 * b} for b in (100, 100, 200, 400)]
    checks = [{"kind": "check", "seconds": 2.0, "iterations": 5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps + checks))
    (tmp_path / "summary.json").write_text(json.dumps({"num_params": 1_000_000}))
    return tmp_path


def test_simulate_from_run_arithmetic(tmp_path):
    out = simulate_from_run(_fake_run(tmp_path), processes=8, latency_s=0.0, bandwidth_bits_per_s=32e6)
    comm = 2 * (7 / 8) * 1_000_000 * 32 / 32e6  # 1.75 s per all-reduce
    assert out["comm_per_update_s"] == pytest.approx(comm)
    assert out["samples"] == 800 and out["updates"] == 4 and out["fixed_updates"] == 8
    comp = 800 * 0.001 / 8
    assert out["adaptive_total_s"] == pytest.approx(comp + 4 * comm + 2.0 / 8 + 5 * comm)
    assert out["fixed_total_s"] == pytest.approx(comp + 8 * comm)
    assert out["speedup"] == pytest.approx(out["fixed_total_s"] / out["adaptive_total_s"])
    # more processes than the first batch has samples: the model's compute / p no longer holds
    with pytest.warns(UserWarning, match=r"processes=512 is more than the run's first batch \(100\)"):
        simulate_from_run(_fake_run(tmp_path), processes=512)


def test_a_run_on_several_processes_and_absa_fgsm(tmp_path):
    """A run measured on 2 processes shared its steps and checks between them: one process's time is
    twice its records' (they were divided again); the fixed-batch baseline is BL, without the FGSM
    time ABSA's steps include (the baseline paid for it)."""
    run = _fake_run(tmp_path)
    one = simulate_from_run(run, processes=8, latency_s=0.0, bandwidth_bits_per_s=32e6)
    (run / "summary.json").write_text(
        json.dumps({"num_params": 1_000_000, "processes": 2, "adversarial_time_s": 0.1})
    )
    two = simulate_from_run(run, processes=8, latency_s=0.0, bandwidth_bits_per_s=32e6)
    comm = one["comm_per_update_s"]
    assert two["per_sample_compute_s"] == pytest.approx(2 * one["per_sample_compute_s"])
    assert two["adaptive_total_s"] == pytest.approx(2 * 800 * 0.001 / 8 + 4 * comm + 2 * 2.0 / 8 + 5 * comm)
    assert two["adversarial_s"] == pytest.approx(0.2)
    assert two["fixed_total_s"] == pytest.approx((2 * 800 * 0.001 - 0.2) / 8 + 8 * comm)


def test_a_block_hessian_check_all_reduces_its_block(tmp_path):
    """A check's products all-reduce the block's vector, not the whole model's (charged before)."""
    run = _fake_run(tmp_path)
    whole = simulate_from_run(run, processes=8, latency_s=0.0, bandwidth_bits_per_s=32e6)
    records = (
        (run / "metrics.jsonl")
        .read_text()
        .replace('"iterations": 5', '"iterations": 5, "block_params": 1000')
    )
    (run / "metrics.jsonl").write_text(records)
    block = simulate_from_run(run, processes=8, latency_s=0.0, bandwidth_bits_per_s=32e6)
    comm, comm_block = whole["comm_per_update_s"], 2 * (7 / 8) * 1000 * 32 / 32e6
    assert whole["adaptive_hessian_s"] == pytest.approx(2.0 / 8 + 5 * comm)
    assert block["adaptive_hessian_s"] == pytest.approx(2.0 / 8 + 5 * comm_block)


def test_cli_json_and_errors(tmp_path, capsys):
    assert main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["method"] for r in rows] == ["BL", "GG", "ABS", "ABSA"] and all(r["total_s"] > 0 for r in rows)
    with pytest.raises(UserError, match="bogus"):
        main(["bogus=1"])
    with pytest.raises(UserError, match="run_dir"):
        main([f"run_dir={tmp_path}"])
    for bad in ("0", "-5"):
        with pytest.raises(UserError, match="^num_params: must be > 0"):
            main([f"run_dir={_fake_run(tmp_path)}", f"num_params={bad}"])
    with pytest.raises(UserError, match="num_params"):  # the unknown-key message lists every key
        main(["nparams=5"])
    run = _fake_run(tmp_path)
    for args, message in (
        (["processes=8"], "^processes: applies to run_dir= only"),  # the preset ignored it, silently
        (["preset=imagenet_i3", f"run_dir={run}"], "^preset: give preset= .* or run_dir= .*, not both"),
        ([f"run_dir={run}", "latency_us=nan"], "^latency_us: must be a finite number >= 0, got nan"),
        ([f"run_dir={run}", "processes=2.5"], "^processes: expected an integer, got '2.5'"),
    ):
        with pytest.raises(UserError, match=message):
            main(args)
    records = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*records, '{"kind": "step", "batch_size": 100}']) + "\n")
    with pytest.raises(UserError, match="has step records without step_time_s"):  # was a KeyError
        main([f"run_dir={run}"])
    proc = subprocess.run(
        [sys.executable, "-m", "scaling_abs", "simulate", f"run_dir={run}", "processes=x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert math.isfinite(json.loads(json.dumps(rows))[0]["total_s"])
