import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaling_abs.errors import UserError
from scaling_abs.report import (
    _legends,
    assign_colors,
    comparison_table,
    load_run,
    main,
    name_runs,
    plot_eigenvalues,
    plot_schedule,
    summary_table,
)

ROOT = Path(__file__).resolve().parents[1]


def fake_run(root, name, strategy, batch, max_batch, acc, updates):
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(
        yaml.safe_dump(
            {"strategy": strategy, "batch_size": batch, "max_batch_size": max_batch, "hessian_block": "all"}
        )
    )
    (d / "summary.json").write_text(
        json.dumps(
            {
                "test_accuracy": acc,
                "updates": updates,
                "max_batch_size": max_batch,
                "wall_time_s": 100.0,
                "curvature_time_s": 5.0,
            }
        )
    )
    records = [
        {"kind": "step", "epoch": e / 4, "batch_size": batch * (1 + e // 2), "lr": 0.1, "loss": 1.0 / (e + 1)}
        for e in range(8)
    ]
    records += [
        {"kind": "eval", "epoch": 1.0, "test_accuracy": acc},
        {"kind": "check", "epoch": 1.0, "eigenvalue": 3.0},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def test_tables_hold_the_numbers(tmp_path):
    runs = [
        load_run(fake_run(tmp_path, "bl", "bl", 128, 128, 0.9012, 9375)),
        load_run(fake_run(tmp_path, "absa", "absa", 128, 8192, 0.9034, 2100)),
    ]
    assert len(runs[1].steps) == 8 and len(runs[1].checks) == 1 and len(runs[1].evals) == 1
    table = summary_table(runs)
    assert "| 90.12 | 9,375 |" in table and "| 90.34 | 2,100 |" in table and "| 5.0 |" in table
    paper = comparison_table(runs)
    assert "| 128 | 90.12 / 9,375 | - |" in paper and "| 8192 | - | 90.34 / 2,100 |" in paper


def test_runs_of_the_same_name_or_cell_stay_apart(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    runs = [
        load_run(fake_run(tmp_path / "a", "demo", "absa", 128, 4096, 0.9155, 2184)),
        load_run(fake_run(tmp_path / "b", "demo", "absa", 128, 4096, 0.9170, 1876)),
        load_run(fake_run(tmp_path, "bl", "bl", 128, 128, 0.9185, 3750)),
    ]
    name_runs(runs)
    assert [r.name for r in runs] == ["a/demo", "b/demo", "bl"]
    table = summary_table(runs)
    assert "| a/demo | absa |" in table and "| b/demo | absa |" in table
    # one cell, two runs: both shown, each with its name, none dropped
    assert "| 4096 | - | 91.55 / 2,184 (a/demo); 91.70 / 1,876 (b/demo) |" in comparison_table(runs)
    # BL trains at its batch: its label and B_max column say so (they read "B_max 128")
    assert _legends(runs) == ["a/demo: ABSA (B_max 4096)", "b/demo: ABSA (B_max 4096)", "bl: BL (batch 128)"]
    assert _legends(runs[1:]) == ["ABSA (B_max 4096)", "BL (batch 128)"]  # names only when needed
    assert "| bl | bl | - |" in table
    assign_colors(runs)
    assert [r.color for r in runs] == ["C0", "C1", "C2"]  # kept in a figure of a subset too


def test_main_writes_report_and_figures(tmp_path, capsys):
    dirs = [
        str(fake_run(tmp_path, n, s, 128, m, 0.9, 100)) for n, s, m in (("a", "bl", 128), ("b", "abs", 512))
    ]
    assert main([*dirs, "--out", str(tmp_path / "rep")]) == 0
    for name in ("report.md", "report.json", "schedule.png", "training.png", "eigenvalues.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert "Paper layout" in capsys.readouterr().out


def test_errors(tmp_path):
    with pytest.raises(UserError, match="summary.json"):
        load_run(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "scaling_abs", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_out_must_be_a_folder_and_damaged_metrics_lines_are_skipped(tmp_path):
    run = fake_run(tmp_path, "a", "bl", 128, 128, 0.9, 100)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(UserError, match="^--out: .*afile is a file"):
        main([str(run), "--out", str(afile)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "st')  # a run killed mid-write
    with pytest.warns(UserWarning, match="skipped 1 damaged line"):
        assert len(load_run(run).steps) == 8


@pytest.mark.parametrize("content", ['{"test_accuracy": 0.9, "upd', "", "[1, 2]"])
def test_a_damaged_summary_is_one_line(tmp_path, content):
    run = fake_run(tmp_path, "a", "bl", 128, 128, 0.9, 100)
    (run / "summary.json").write_text(content)
    with pytest.raises(UserError, match="^run: .*summary.json"):
        load_run(run)
    from scaling_abs.simulate import main as simulate_main

    with pytest.raises(UserError, match="^run: .*summary.json"):
        simulate_main([f"run_dir={run}"])


@pytest.mark.parametrize(
    "key, value, shown",
    [("updates", None, "updates is null"), ("wall_time_s", "long", 'wall_time_s is "long"'),
     ("max_batch_size", 1.5, "max_batch_size is 1.5")],
)  # fmt: skip
def test_a_summary_with_a_wrong_value_is_one_line(tmp_path, key, value, shown):
    """JSON that parses, with a field of the wrong type: a TypeError from the table's formatting."""
    run = fake_run(tmp_path, "a", "bl", 128, 128, 0.9, 100)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, key: value}))
    with pytest.raises(UserError, match=f"^run: .*summary.json: {shown} "):
        load_run(run)


def test_records_without_what_the_figures_read_are_skipped(tmp_path):
    """A step record without its epoch was a KeyError in the schedule figure."""
    run = fake_run(tmp_path, "a", "absa", 128, 1024, 0.9, 100)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "step", "batch_size": 128, "lr": 0.1, "loss": 0.5}) + "\n")
        f.write(json.dumps({"kind": "eval", "epoch": 2.0, "test_accuracy": None}) + "\n")
    with pytest.warns(UserWarning, match="skipped 2 record"):
        loaded = load_run(run)
    assert (len(loaded.steps), len(loaded.evals), len(loaded.checks)) == (8, 1, 1)
    with pytest.warns(UserWarning, match="skipped 2 record"):
        assert main([str(run), "--out", str(tmp_path / "report")]) == 0


def test_an_interrupted_run_is_marked_in_the_table(tmp_path):
    run = fake_run(tmp_path, "a", "absa", 128, 1024, 0.9, 100)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "interrupted": True}))
    assert "| a (interrupted) | absa |" in summary_table([load_run(run)])


def test_what_a_user_can_damage_is_one_line_and_interrupted_runs_say_so(tmp_path):
    run = fake_run(tmp_path, "r", "absa", 128, 4096, 0.9, 100)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "interrupted": True}))
    assert "| 4096 | 90.00 / 100 (interrupted) |" in comparison_table([load_run(run)])
    (run / "config.yaml").write_text("strategy: [absa")
    with pytest.raises(UserError, match=r"^run: .*config.yaml cannot be read"):
        load_run(run)
    (run / "config.yaml").write_text("- a\n")
    with pytest.raises(UserError, match=r"^run: .*config.yaml is not a config"):
        load_run(run)
    (run / "config.yaml").unlink()  # the strategy comes from the summary then; no known batch
    (run / "summary.json").write_text(json.dumps({**summary, "strategy": "absa"}))
    alone = load_run(run)
    assert alone.config == {"strategy": "absa"} and alone.label == "ABSA (B_max ?)"
    assert comparison_table([alone]).splitlines()[2:] == []  # no row of batch 0
    (run / "summary.json").write_text(json.dumps({"test_accuracy": 0.5, "updates": 3}))
    with pytest.raises(UserError, match=r"^run: .*summary.json lacks max_batch_size, wall_time_s"):
        load_run(run)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match=r"^run: .*metrics.jsonl is not a file"):
        load_run(run)


def test_committed_result_folders_keep_their_checks_and_evaluations(tmp_path):
    """benchmarks/results/ keeps checks_and_evals.jsonl, not metrics.jsonl: report read neither."""
    run = load_run(ROOT / "benchmarks" / "results" / "demo")
    assert len(run.checks) == 32 and run.evals and not run.steps


def test_the_schedule_draws_each_step_from_its_start(tmp_path, monkeypatch):
    """A step's record has the batch and LR it trained with and the epoch at its end: drawn from
    its end (where="post"), every change came one step late."""
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(
        matplotlib.axes.Axes, "step", lambda self, x, y, **kw: drawn.append((list(x), list(y)))
    )
    run = load_run(fake_run(tmp_path, "r", "absa", 128, 4096, 0.9, 100))
    plot_schedule([run], tmp_path / "schedule.png")
    epochs, batches = drawn[0]
    assert epochs == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert batches == [128, 128, 256, 256, 384, 384, 512, 512, 512]


def test_the_eigenvalue_figure_draws_magnitudes_and_counts_what_it_leaves_out(tmp_path, monkeypatch):
    """ABS compares magnitudes; a negative estimate vanished from the log axis and a NaN broke the
    line, both without a word."""
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: drawn.append((list(x), list(y)))
    )
    run = load_run(fake_run(tmp_path, "r", "absa", 128, 4096, 0.9, 100))
    run.checks = [
        {"epoch": 1.0, "eigenvalue": 4.0},
        {"epoch": 2.0, "eigenvalue": -3.0},
        {"epoch": 3.0, "eigenvalue": float("nan")},
        {"epoch": 4.0, "eigenvalue": None},
    ]
    with pytest.warns(UserWarning, match=r"leaves out non-finite estimates: r \(2\)"):
        plot_eigenvalues([run], tmp_path / "eigenvalues.png")
    assert drawn == [([1.0, 2.0], [4.0, 3.0])]
