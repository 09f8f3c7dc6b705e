"""The command line: user errors are one line and exit code 2; a real run prints the summary table."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scaling_abs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **(env or {})},
    )


@pytest.mark.parametrize(
    "args, key",
    [
        (["train", "lr=abc"], "lr"),
        (["train", "bogus=1"], "bogus"),
        (["train", "max_batch_size=64"], "max_batch_size"),
        (["train", "beta=1"], "beta"),
        (["train", "adv_fraction=2"], "adv_fraction"),
        (["train", "deepspeed=/nope.json"], "deepspeed"),
        (["train", "data_dir=/no/such/place"], "data_dir"),
        (["train", "--config", "nosuchpreset"], "config"),
        (["train", "model=resnet9000"], "model"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, key):
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("scaling-abs train: error: ") and f"{key}" in lines[0]


def test_missing_fashion_mnist_is_a_user_error(tmp_path):
    proc = cli("train", f"data_dir={tmp_path}", "progress=false", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "data_dir" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_command():
    proc = cli("fly")
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_help_and_help_keys():
    assert "scaling-abs train" in cli("--help").stdout
    keys = cli("train", "--help-keys").stdout
    for key in ("hessian_every", "adv_fraction", "micro_batch_size", "deepspeed", "resume"):
        assert key in keys


def test_version_names_the_library_and_its_dependencies():
    import scaling_abs

    fresh = subprocess.run(  # before torch is imported: the build all the same
        [sys.executable, "-c", "import scaling_abs; print(scaling_abs.versions()['torchvision'])"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert fresh.returncode == 0 and fresh.stdout.strip() == scaling_abs.versions()["torchvision"]

    project = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert scaling_abs.__version__ == project.group(1)  # one version, written twice
    for flag in ("--version", "-V"):
        proc = cli(flag)
        assert proc.returncode == 0, proc.stderr
        line = proc.stdout.strip()
        assert line.startswith(f"scaling-abs {scaling_abs.__version__} (python ")
        found = scaling_abs.versions()
        assert f"torch {found['torch']}," in line and "accelerate " in line
        assert f"torchvision {found['torchvision']}," in line  # was 0.28.0 here, 0.28.0+cu130 there


def test_a_small_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = cli(
        "train",
        "model=mlp",
        "strategy=absa",
        "limit_train_samples=512",
        "epochs=1",
        "batch_size=64",
        "max_batch_size=256",
        "hessian_every=128",
        "hessian_samples=64",
        "kappa=1",
        "progress=false",
        f"output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test accuracy" in proc.stdout and "largest batch" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_batch_size"] == 256
    config = (out / "config.yaml").read_text()
    assert "strategy: absa" in config and "hessian_every: 128" in config


@pytest.mark.parametrize("command", ["train", "simulate", "report", "convex", "compare"])
def test_every_command_has_help(command):
    proc = cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: scaling-abs {command}"), proc.stdout
    assert proc.stderr == ""


def test_a_keyboard_interrupt_outside_the_loop_is_one_line_and_130(monkeypatch, capsys):
    from scaling_abs import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert cli.main(["train"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def _warning_lines(tmp_path, marker: str, *settings: str) -> list[str]:
    """The stderr lines holding ``marker`` of a small training run that must succeed."""
    proc = cli("train", *settings, "progress=false", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if marker in line]


def test_our_warnings_are_one_line_on_the_command_line(tmp_path):
    # a batch with no divisor near micro_batch_size: the trainer warns once
    ours = _warning_lines(
        tmp_path, "micro-batches of 1", "model=mlp", "strategy=bl", "limit_train_samples=254", "epochs=1",
        "batch_size=127", "max_batch_size=127", "micro_batch_size=64",
    )  # fmt: skip
    assert len(ours) == 1 and ours[0].startswith("scaling-abs: warning: batch 127 runs as 127")


def test_a_warning_during_the_progress_bar_gets_a_line_of_its_own(tmp_path):
    """The batch's warning comes once the bar is drawn: it was written onto the bar's line."""
    proc = cli(
        "train", "model=mlp", "strategy=bl", "limit_train_samples=254", "epochs=1", "batch_size=127",
        "max_batch_size=127", "micro_batch_size=64", "progress=true", f"output_dir={tmp_path / 'run'}",
        env={"TQDM_MININTERVAL": "0"},  # every update drawn
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sample/s" in proc.stderr  # the bar was there
    lines = [line for line in proc.stderr.split("\n") if "micro-batches of 1" in line]
    # what the terminal shows of that line: the text after its last carriage return
    assert len(lines) == 1 and lines[0].split("\r")[-1].startswith("scaling-abs: warning: batch 127")


def test_a_run_too_short_for_kappa_says_so_in_one_line(tmp_path):
    # once an epoch (the default) for one epoch: one check, at the last step, and kappa=10 needs 11
    ours = _warning_lines(
        tmp_path, "kappa=10", "model=mlp", "strategy=abs", "limit_train_samples=256", "epochs=1",
        "batch_size=64", "max_batch_size=128", "hessian_samples=64",
    )  # fmt: skip
    assert len(ours) == 1 and ours[0].startswith("scaling-abs: warning: 0 curvature checks before the last")
    assert ours[0].endswith("the batch cannot grow (the run has too few steps for 11)")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["max_batch_size"] == 64


def test_the_summary_table_of_a_run_stopped_before_any_evaluation_reads_n_a():
    from scaling_abs.cli import format_summary

    summary = {
        "strategy": "absa", "model": "cnn", "dataset": "fashion_mnist", "test_accuracy": None, "updates": 3,
        "max_batch_size": 128, "wall_time_s": 2.0, "curvature_time_s": 0.0, "curvature_checks": 0,
        "interrupted": True,
    }  # fmt: skip
    table = format_summary(summary, "runs/x")
    assert "test accuracy            n/a\n" in table and "resume=auto continues" in table
    assert "91.83 %" in format_summary({**summary, "test_accuracy": 0.9183, "interrupted": False}, "runs/x")
