"""The strategy comparison: the grid it runs, its errors, and a tiny real grid end to end."""

import json
import subprocess
import sys

import pytest

from scaling_abs.cli import main as cli_main
from scaling_abs.compare import grid


def test_grid_is_the_papers_table():
    cells = grid(["bl", "fb", "gg", "abs", "absa"], [128, 512, 2048], 128, "last:2", 2048)
    names = [c.name for c in cells]
    # growing strategies are N.A. at the initial batch; BL runs at every size
    assert names[:1] == ["bl_128"] and "absa_128" not in names
    assert names[1:6] == ["bl_512", "fb_512", "gg_512", "abs_512", "absa_512"]
    assert names[-1] == "absa_2048_block" and len(cells) == 1 + 5 + 5 + 1
    bl = next(c for c in cells if c.name == "bl_512")
    assert "batch_size=512" in bl.overrides
    absa = next(c for c in cells if c.name == "absa_2048")
    assert {"batch_size=128", "max_batch_size=2048", "strategy=absa"} <= set(absa.overrides)
    assert "hessian_block=last:2" in cells[-1].overrides


def test_a_cells_settings_come_after_the_grids(capsys):
    """batch_size=256 for every run trained every BL cell at 256: the extras came last and won."""
    args = [
        "compare",
        "batch_size=256",
        "--dry-run",
        "--sizes",
        "256",
        "1024",
        "--strategies",
        "bl",
        "bl",
        "gg",
    ]
    assert cli_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3  # bl_256, bl_1024, gg_1024: bl named twice is one run per cell
    bl_1024 = next(line for line in lines if "output_dir=runs/compare/bl_1024" in line)
    assert bl_1024.index("batch_size=256") < bl_1024.index("batch_size=1024")


def test_dry_run_prints_one_train_command_per_run(capsys):
    assert cli_main(["compare", "--dry-run", "--sizes", "128", "256", "--strategies", "bl", "absa"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # bl_128, bl_256, absa_256, absa_256_block
    assert all(" train --config fmnist_s1 " in line and "resume=auto" in line for line in lines)


@pytest.mark.parametrize(
    "args, key",
    [(["strategy=bl"], "strategy"), (["--sizes", "100"], "--sizes"), (["--jobs", "0"], "--jobs"),
     (["lr=-1"], "lr"), (["--out", __file__], "--out"),
     # made every ABSA run a block-Hessian one (and the paper table then left them all out)
     (["hessian_block=last:1"], "hessian_block is set per run"),
     (["--focus", "999"], "--focus must be one of --sizes"),  # launched an off-grid run
     (["--sizes", "128", "--strategies", "abs"], "no runs: BL runs at every size")],
)  # fmt: skip
def test_user_errors_are_one_line_exit_2(args, key, capsys):
    assert cli_main(["compare", "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err


def test_report_only_with_nothing_finished_is_one_line_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    assert cli_main(["compare", "--report-only", "--out", str(empty)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--report-only: no finished runs under {empty}")
    assert not empty.exists()  # it made the folder and commands.txt first


@pytest.mark.slow
def test_a_tiny_grid_end_to_end_and_rerun_skips_finished_runs(tmp_path):
    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "scaling_abs", "compare", "--sizes", "64", "128", "--strategies", "bl", "abs",
           "--block", "", "--out", str(out), "--config", "fmnist_s1", "model=mlp", "batch_size=64",
           "micro_batch_size=64", "epochs=0.25", "limit_train_samples=2048", "hessian_every=128",
           "hessian_samples=64", "kappa=1", "eval_every=0.25", "lr_decay_epochs=[]", "tensorboard=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "logs") == [
        "abs_128",
        "bl_128",
        "bl_64",
    ]
    report = (out / "report.md").read_text()
    assert "| 128 |" in report and "| 64 |" in report and "commands.txt" not in report
    runs = json.loads((out / "report.json").read_text())
    abs_run = next(r for r in runs if r["run"] == "abs_128")
    assert abs_run["summary"]["max_batch_size"] == 128  # kappa = 1: grew at the second check
    for name in ("schedule.png", "training.png", "eigenvalues.png", "commands.txt"):
        assert (out / name).stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "3 already finished" in again.stdout
    assert "3 of 3 runs finished" in again.stdout
    # finished runs of other settings are not this grid's (they were tabulated under its header)
    other = subprocess.run([*cmd, "epochs=0.5"], capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "finished with other settings (epochs) than this grid gives it" in other.stderr
    # --report-only tabulates what is finished and starts nothing, naming what is missing
    (out / "abs_128" / "summary.json").unlink()
    only = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, timeout=600)
    assert only.returncode == 0, only.stderr[-2000:]
    assert "0 already finished" not in only.stdout and "Not finished: abs_128." in only.stdout
    assert not (out / "abs_128" / "summary.json").exists()
    assert "abs_128" not in {r["run"] for r in json.loads((out / "report.json").read_text())}
