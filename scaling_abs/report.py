"""Tables and figures from run folders (``scaling-abs report RUN_DIR... [--out DIR]``).

A run folder holds ``config.yaml``, ``summary.json`` and ``metrics.jsonl`` (written by the trainer).
The figures follow the paper: batch size and LR against epochs (Figure 1), training loss and test
accuracy against epochs (Figure 2), the top Hessian eigenvalue over training (Figure 6).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scaling_abs.cli import percent
from scaling_abs.config import check_output_dir
from scaling_abs.errors import UserError, is_whole


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    steps: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    name: str = ""  # the folder's name; see name_runs
    color: str = ""  # the run's colour in every figure; see assign_colors

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name

    @property
    def label(self) -> str:
        strategy = str(self.config.get("strategy", "?"))
        if strategy == "bl":  # BL trains at its batch_size; B_max is no setting of it
            return f"BL (batch {self.config.get('batch_size', '?')})"
        return f"{strategy.upper()} (B_max {self.config.get('max_batch_size', '?')})"


def name_runs(runs: list[Run]) -> None:
    """Each run's ``name``: its folder's name, or with as many parent folders as tell it from the
    other runs' (``a/demo`` and ``b/demo`` beside ``bl``), so no two rows or curves read alike."""
    parts = [r.path.resolve().parts for r in runs]
    for r, mine in zip(runs, parts):
        others = [p for p in parts if p != mine]
        depth = 1
        while depth < len(mine) and any(p[-depth:] == mine[-depth:] for p in others):
            depth += 1
        r.name = "/".join(mine[-depth:])


def _legends(runs: list[Run]) -> list[str]:
    """Curve labels: strategy and B_max, with the run's name when two runs share them."""
    labels = [r.label for r in runs]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{r.name}: {label}" for r, label in zip(runs, labels)]


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's ``summary.json``; a damaged one is a one-line error, not a traceback."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"run: {run_dir / 'summary.json'} cannot be read ({e})") from None
    if not isinstance(summary, dict):
        raise UserError(f"run: {run_dir / 'summary.json'} is not a summary (a JSON object)")
    return summary


def read_records(metrics: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``; a damaged line (a run killed mid-write) is skipped
    with a warning."""
    records, damaged = [], 0
    for line in metrics.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(record, dict):
            records.append(record)
    if damaged:
        warnings.warn(f"{metrics}: skipped {damaged} damaged line(s) (a run killed mid-write?)", stacklevel=2)
    return records


SUMMARY_KEYS = ("test_accuracy", "updates", "max_batch_size", "wall_time_s", "curvature_time_s")
# a run's records: the trainer's metrics.jsonl, else the checks' and evaluations' alone, as the
# committed result folders under benchmarks/results/ keep them
RECORD_FILES = ("metrics.jsonl", "checks_and_evals.jsonl")


def load_run(path: str | Path) -> Run:
    """A run folder: its summary, config (else the strategy its summary names) and records. What a
    user can damage (the YAML, the summary's fields, a records path that is a folder) is one line."""
    path = Path(path)
    if not (path / "summary.json").exists():
        raise UserError(f"run: {path} has no summary.json (not a finished scaling-abs run)")
    summary = read_summary(path)
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise UserError(
            f"run: {path / 'summary.json'} lacks {', '.join(missing)} (not written by scaling-abs train)"
        )
    wrong = [k for k in SUMMARY_KEYS if not _summary_value_ok(k, summary[k])]
    if wrong:
        shown = ", ".join(f"{k} is {json.dumps(summary[k])}" for k in wrong)
        raise UserError(f"run: {path / 'summary.json'}: {shown} (not written by scaling-abs train)")
    config: Any = {}
    if (path / "config.yaml").exists():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(
                f"run: {path / 'config.yaml'} cannot be read ({str(e).splitlines()[0]})"
            ) from None
        if not isinstance(config, dict):
            raise UserError(f"run: {path / 'config.yaml'} is not a config (a mapping of keys)")
    elif summary.get("strategy"):
        config = {"strategy": summary["strategy"]}
    run = Run(path, config, summary)
    for name in RECORD_FILES:
        records = path / name
        if records.exists():
            if not records.is_file():
                raise UserError(f"run: {records} is not a file")
            lists = {"step": run.steps, "check": run.checks, "eval": run.evals}
            unusable = 0
            for r in read_records(records):
                kind = r.get("kind")
                if kind not in lists:
                    continue
                if all(_is_number(r.get(k)) for k in RECORD_FIELDS[kind]):
                    lists[kind].append(r)
                else:
                    unusable += 1
            if unusable:
                fields = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in RECORD_FIELDS.items())
                warnings.warn(
                    f"{records}: skipped {unusable} record(s) without the numbers the figures read ({fields})",
                    stacklevel=2,
                )
            break
    return run


# what the figures read of each kind of record (a check's eigenvalue may be non-finite or absent:
# plot_eigenvalues counts those)
RECORD_FIELDS = {
    "step": ("epoch", "batch_size", "lr", "loss"),
    "check": ("epoch",),
    "eval": ("epoch", "test_accuracy"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _summary_value_ok(key: str, value: Any) -> bool:
    """The tables' summary fields: counts are whole numbers (``errors.is_whole``), times numbers,
    the accuracy a number or null (a run stopped before its first evaluation)."""
    if key in ("updates", "max_batch_size"):
        return is_whole(value, 0)
    if key == "test_accuracy" and value is None:
        return True
    return _is_number(value)


def summary_table(runs: list[Run]) -> str:
    """One row per run: accuracy, updates, largest batch, wall time, curvature share."""
    lines = [
        "| run | strategy | B_max | test acc. (%) | updates | largest batch | wall time (s) | curvature (% of time) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        s = r.summary
        share = 100 * s["curvature_time_s"] / s["wall_time_s"] if s.get("wall_time_s") else 0.0
        lines.append(
            f"| {r.name}{' (interrupted)' if s.get('interrupted') else ''} | "
            f"{r.config.get('strategy', '?')} | "
            f"{'-' if r.config.get('strategy') == 'bl' else r.config.get('max_batch_size', '?')} | "
            f"{percent(s['test_accuracy'])} | {s['updates']:,} | {s['max_batch_size']:,} | "
            f"{s['wall_time_s']:.0f} | {share:.1f} |"
        )
    return "\n".join(lines)


def comparison_table(runs: list[Run]) -> str:
    """The paper's Table 1 layout: rows = largest allowed batch, columns = "acc. / updates" per method."""
    methods = [
        m for m in ("bl", "fb", "gg", "abs", "absa") if any(r.config.get("strategy") == m for r in runs)
    ]
    sizes = sorted(
        {
            int(r.config.get("max_batch_size", 0))
            if r.config.get("strategy") != "bl"
            else int(r.config.get("batch_size", 0))
            for r in runs
        }
    )
    sizes = [b for b in sizes if b]  # a run without its config has no known batch: not tabulated here
    cell: dict[tuple[int, str], list[Run]] = {}
    for r in runs:
        m = r.config.get("strategy")
        b = int(r.config.get("batch_size" if m == "bl" else "max_batch_size", 0))
        cell.setdefault((b, m), []).append(r)

    def text(key: tuple[int, str]) -> str:
        shown = cell.get(key, [])
        entries = [
            f"{percent(r.summary['test_accuracy'])} / {r.summary['updates']:,}"
            + (" (interrupted)" if r.summary.get("interrupted") else "")
            for r in shown
        ]
        if len(shown) > 1:  # several runs in one cell: each, with its name
            entries = [f"{e} ({r.name})" for e, r in zip(entries, shown)]
        return "; ".join(entries) or "-"

    lines = [
        "| batch | " + " | ".join(f"{m.upper()} acc. / updates" for m in methods) + " |",
        "| --- |" + " --- |" * len(methods),
    ]
    for b in sizes:
        lines.append(f"| {b} | " + " | ".join(text((b, m)) for m in methods) + " |")
    return "\n".join(lines)


def assign_colors(runs: list[Run]) -> None:
    """One colour per run, by its place in ``runs``, kept in every figure drawn from any subset of
    them (a run without checks, or left out of one figure, does not shift the others')."""
    for i, r in enumerate(runs):
        r.color = _nth_color(i)


def _nth_color(i: int) -> str:
    return f"C{i % 10}"  # matplotlib's default cycle


def _color(r: Run, i: int) -> str:
    """The run's assigned colour, else the i-th (runs plotted without :func:`assign_colors`)."""
    return r.color or _nth_color(i)


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4))
    return plt, fig, axes


def _legend(ax) -> None:
    """A legend where there are curves (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_schedule(runs: list[Run], path: str | Path) -> None:
    """Figure 1: global batch size and learning rate against epochs."""
    plt, fig, (ax_b, ax_lr) = _figure(2)
    for i, (r, label) in enumerate(zip(runs, _legends(runs))):
        if not r.steps:
            continue
        # a step's record holds the batch and LR it trained with, stamped with the epoch at its end:
        # each is drawn from the step's start, the step before's end (a step of 0.55 epoch drew its
        # LR drop that much late)
        ends = [s["epoch"] for s in r.steps]
        ep = [0.0, *ends[:-1], ends[-1]]
        batch, lr = [s["batch_size"] for s in r.steps], [s["lr"] for s in r.steps]
        color = _color(r, i)
        ax_b.step(ep, [*batch, batch[-1]], where="post", label=label, color=color)
        ax_lr.step(ep, [*lr, lr[-1]], where="post", label=label, color=color)
    ax_b.set(xlabel="epoch", ylabel="global batch size", yscale="log", title="batch size")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="learning rate")
    _legend(ax_b)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(runs: list[Run], path: str | Path) -> None:
    """Figure 2: training loss and test accuracy against epochs."""
    plt, fig, (ax_l, ax_a) = _figure(2)
    for i, (r, label) in enumerate(zip(runs, _legends(runs))):
        steps, color = r.steps, _color(r, i)
        ax_l.plot([s["epoch"] for s in steps], [s["loss"] for s in steps], lw=0.6, label=label, color=color)
        ax_a.plot(
            [e["epoch"] for e in r.evals],
            [100 * e["test_accuracy"] for e in r.evals],
            marker="o",
            label=label,
            color=color,
        )
    ax_l.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_a.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    _legend(ax_a)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_eigenvalues(runs: list[Run], path: str | Path) -> None:
    """Figure 6: the top Hessian eigenvalue at each check (full or block, solver and warm start as
    the run's config says)."""
    plt, fig, ax = _figure(1)
    left_out = []
    for i, (r, label) in enumerate(zip(runs, _legends(runs))):
        # magnitudes, as ABS compares them (the estimate is the largest-magnitude eigenvalue, which
        # can be negative); a non-finite one has no place on the axis and is counted instead
        checks = [
            c
            for c in r.checks
            if isinstance(c.get("eigenvalue"), (int, float)) and math.isfinite(c["eigenvalue"])
        ]
        if len(checks) < len(r.checks):
            left_out.append(f"{r.name} ({len(r.checks) - len(checks)})")
        if checks:
            block = r.config.get("hessian_block", "all")
            how = [f"{'full' if block == 'all' else block} Hessian"]
            if r.config.get("hessian_solver", "power") != "power":
                how.append(r.config["hessian_solver"])
            if r.config.get("hessian_warm_start"):
                how.append("warm start")
            ax.plot(
                [c["epoch"] for c in checks],
                [abs(c["eigenvalue"]) for c in checks],
                marker=".",
                label=", ".join([label, *how]),
                color=_color(r, i),
            )
    if left_out:
        warnings.warn(f"eigenvalues.png leaves out non-finite estimates: {', '.join(left_out)}", stacklevel=2)
    ax.set(
        xlabel="epoch", ylabel="|top eigenvalue|", yscale="log", title="top Hessian eigenvalue (magnitude)"
    )
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """``scaling-abs report RUN_DIR... [--out DIR]``: report.md, report.json and three PNGs."""
    parser = argparse.ArgumentParser(
        prog="scaling-abs report",
        description="Tables (report.md, report.json) and figures (schedule, training, eigenvalues) from run folders.",
    )
    parser.add_argument("dirs", nargs="*", metavar="RUN_DIR", help="folders written by scaling-abs train")
    parser.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/../report)")
    args = parser.parse_args(argv)
    dirs, out = args.dirs, args.out
    if not dirs:
        raise UserError("report: give one or more run folders")
    out = out or Path(dirs[0]).parent / "report"
    check_output_dir(out, "--out")
    unique = list(dict.fromkeys(Path(d).resolve() for d in dirs))  # a folder given twice: once
    runs = [load_run(d) for d in unique]
    name_runs(runs)
    assign_colors(runs)
    stepless = [r.name for r in runs if not r.steps]
    if stepless:
        warnings.warn(
            f"{', '.join(stepless)}: no step records (metrics.jsonl), so no curves in schedule.png and "
            "training.png's loss panel",
            stacklevel=2,
        )
    out.mkdir(parents=True, exist_ok=True)
    text = "## Runs\n\n" + summary_table(runs) + "\n\n## Paper layout\n\n" + comparison_table(runs) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps([{"run": str(r.path), "config": r.config, "summary": r.summary} for r in runs], indent=2)
    )
    plot_schedule(runs, out / "schedule.png")
    plot_training(runs, out / "training.png")
    plot_eigenvalues(runs, out / "eigenvalues.png")
    print(text)
    print(f"written: {out}/report.md, report.json, schedule.png, training.png, eigenvalues.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
