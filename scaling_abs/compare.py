"""The strategy comparison of the paper's Tables 1-2 and 4-7, run for real (``scaling-abs compare``).

Every (strategy, batch size) cell is one ``scaling-abs train`` run in its own process and folder:

* BL at each batch size B (fixed batch, the base LR: the paper's "BL" column, large-batch degradation);
* FB at B (Goyal et al.: LR scaled from ``batch_size``, warm-up);
* GG, ABS, ABSA growing from ``batch_size`` up to B (``max_batch_size = B``);
* optionally ABSA with a block Hessian at one size, for Figure 6 (full against block eigenvalues).

A finished cell (``summary.json`` without ``interrupted``) is not run again and an interrupted one
continues from its checkpoint (``resume=auto``), so the whole grid survives preemption: run the same
command again. A finished cell whose ``config.yaml`` differs from what the grid gives it now is
refused, not tabulated. The ``key=value`` settings apply to every run; each cell's own come after
them. At the end, ``report.md`` (the paper's layout and a per-run table), ``report.json``,
``commands.txt`` and the three figures are written into ``--out``.

    scaling-abs compare                                   # fmnist_s1, 128 ... 32768, all strategies
    scaling-abs compare --sizes 128 2048 --strategies bl absa --jobs 2 epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from scaling_abs.config import STRATEGIES, check_output_dir, load_config
from scaling_abs.errors import UserError

DEFAULT_SIZES = (128, 512, 2048, 8192, 32768)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its folder name and the overrides that make it."""

    name: str
    strategy: str
    size: int
    overrides: tuple[str, ...]


def grid(
    strategies: list[str], sizes: list[int], base_batch: int, block: str, block_size: int | None
) -> list[Cell]:
    """The runs of the comparison. Growing strategies need ``size > base_batch`` (the paper's N.A.)."""
    cells = []
    for size in sizes:
        for s in strategies:
            if s == "bl":
                cells.append(
                    Cell(
                        f"bl_{size}", s, size, ("strategy=bl", f"batch_size={size}", f"max_batch_size={size}")
                    )
                )
            elif size > base_batch:
                over = (f"strategy={s}", f"batch_size={base_batch}", f"max_batch_size={size}")
                cells.append(Cell(f"{s}_{size}", s, size, over))
    if block and block_size:
        over = (
            "strategy=absa",
            f"batch_size={base_batch}",
            f"max_batch_size={block_size}",
            f"hessian_block={block}",
        )
        cells.append(Cell(f"absa_{block_size}_block", "absa", block_size, over))
    return cells


def _finished(run_dir: Path) -> bool:
    """A summary of a run that was not interrupted (a damaged one: not finished; the run resumes)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and not summary.get("interrupted", False)


# set by compare for every run, or no part of a run's results: not compared with a finished run's
PER_RUN = (
    "output_dir",
    "resume",
    "progress",
    "tensorboard",
    "num_workers",
    "checkpoint_every",
    "keep_checkpoints",
)


def _settled_differently(run_dir: Path, wanted: dict) -> list[str]:
    """The settings in which the finished run in ``run_dir`` differs from its cell's config now
    (``["config.yaml"]`` when it has none): such a run is not this grid's. A key its config lacks
    (added to the library since) is not held against it."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ["config.yaml"]
    if not isinstance(saved, dict):
        return ["config.yaml"]
    wanted = yaml.safe_load(yaml.safe_dump(wanted))  # the same types as a YAML file gives
    return [k for k in wanted if k not in PER_RUN and k in saved and saved[k] != wanted[k]]


def _command(config: str, cell: Cell, out: Path, extra: list[str]) -> list[str]:
    # the cell's settings after the ones for every run: a cell is what its name says
    return [
        sys.executable, "-m", "scaling_abs", "train", "--config", config, *extra, *cell.overrides,
        f"output_dir={out / cell.name}", "resume=auto", "progress=false",
    ]  # fmt: skip


def _run(cmd: list[str], log: Path, threads: int | None) -> tuple[int, float]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.perf_counter() - t0


def _git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def focus_runs(runs, size: int, base_batch: int):
    """The runs drawn in the figures: BL at ``base_batch`` and every method at ``size``."""
    keep = []
    for r in runs:
        s, b = r.config.get("strategy"), int(r.config.get("max_batch_size", 0))
        if (s == "bl" and b == base_batch) or (s != "bl" and b == size):
            keep.append(r)
    return keep


def write_report(out: Path, names: list[str], focus: int, base_batch: int, header: str) -> str:
    """report.md / report.json and the three figures from the finished runs under ``out``."""
    from scaling_abs import report

    finished = [n for n in names if _finished(out / n)]
    if not finished:
        raise UserError(f"no finished runs under {out}")
    runs = [report.load_run(out / n) for n in finished]
    report.assign_colors(runs)  # a run keeps its colour across the three figures' subsets
    full = [r for r in runs if r.config.get("hessian_block", "all") == "all"]
    missing = [n for n in names if n not in finished]
    busy = sum(float(r.summary.get("wall_time_s", 0.0)) for r in runs)
    text = (
        header
        + f"\n{len(runs)} of {len(names)} runs finished; their wall times add up to {busy / 3600:.2f} h "
        + "(each run's own wall_time_s; runs side by side share the machine)."
        + (f" Not finished: {', '.join(missing)}." if missing else "")
        + "\n"
        + "\n## Accuracy and optimizer updates (the paper's layout)\n\n"
        + report.comparison_table(full)
        + "\n\n## Every run\n\n"
        + report.summary_table(runs)
        + "\n"
    )
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps([{"run": r.path.name, "config": r.config, "summary": r.summary} for r in runs], indent=2)
    )
    shown = focus_runs(full, focus, base_batch)
    report.plot_schedule([r for r in shown if r.config.get("strategy") != "fb"], out / "schedule.png")
    report.plot_training(shown, out / "training.png")
    report.plot_eigenvalues(
        [r for r in runs if r.checks and int(r.config["max_batch_size"]) == focus], out / "eigenvalues.png"
    )
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="scaling-abs compare",
        description="Run BL/FB/GG/ABS/ABSA over maximum batch sizes and tabulate accuracy and updates.",
    )
    parser.add_argument("--config", default="fmnist_s1", help="preset or YAML file every run starts from")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES), help="batch sizes B")
    parser.add_argument("--out", default="runs/compare", help="folder of the runs and the report")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each in its own process)")
    parser.add_argument("--threads", type=int, default=0, help="OMP threads per run (0 = torch's default)")
    parser.add_argument("--block", default="last:2", help="block Hessian of the extra ABSA run ('' = none)")
    parser.add_argument(
        "--focus", type=int, default=0, help="batch size drawn in the figures (default: 8192 or the largest)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write report.md and the figures from the grid's finished runs, start none",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    args = parser.parse_args(argv)

    base = load_config(args.config, args.overrides)  # validates the preset and overrides up front
    keys = {o.split("=", 1)[0] for o in args.overrides}
    if keys & {"strategy", "max_batch_size", "output_dir"}:
        raise UserError(
            "strategy, max_batch_size and output_dir are set per run; use --strategies/--sizes/--out"
        )
    if "hessian_block" in keys:
        raise UserError("hessian_block is set per run (the block run's); use --block")
    bad = [b for b in args.sizes if b < base.batch_size or b % base.batch_size]
    if bad:
        raise UserError(f"--sizes must be multiples of batch_size ({base.batch_size}), got {bad[0]}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    sizes = sorted(set(args.sizes))
    strategies = list(dict.fromkeys(args.strategies))  # a strategy named twice: one run per cell
    focus = args.focus or (8192 if 8192 in sizes else sizes[-1])
    if focus not in sizes:
        raise UserError(f"--focus must be one of --sizes ({', '.join(map(str, sizes))}), got {focus}")
    cells = grid(strategies, sizes, base.batch_size, args.block, focus if "absa" in strategies else None)
    if not cells:
        raise UserError(
            f"no runs: BL runs at every size, the others only above batch_size ({base.batch_size}); "
            f"got --sizes {' '.join(map(str, sizes))} --strategies {' '.join(strategies)}"
        )
    # every cell's config is validated before the first run starts
    wanted = {c.name: load_config(args.config, [*args.overrides, *c.overrides]).to_dict() for c in cells}
    out = Path(args.out)
    check_output_dir(out, "--out")
    commands = {c.name: _command(args.config, c, out, args.overrides) for c in cells}
    for c in cells:  # a finished run under --out is this grid's, or the grid stops before starting
        if _finished(out / c.name):
            differ = _settled_differently(out / c.name, wanted[c.name])
            if differ:
                raise UserError(
                    f"{out / c.name} finished with other settings ({', '.join(differ[:4])}) than this "
                    "grid gives it; use another --out, or remove that folder to run it again"
                )
    if args.dry_run:
        for c in cells:
            print(shlex.join(commands[c.name]))
        return 0
    if args.report_only and not any(_finished(out / c.name) for c in cells):
        raise UserError(f"--report-only: no finished runs under {out}")  # and nothing written there
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        todo = []
    else:
        todo = [c for c in cells if not _finished(out / c.name)]
        print(
            f"compare: {len(cells)} runs, {len(cells) - len(todo)} already finished, {args.jobs} at a time -> {out}"
        )

    def launch(c: Cell) -> tuple[Cell, int, float]:
        rc, seconds = _run(commands[c.name], out / "logs" / f"{c.name}.log", args.threads or None)
        status = "done" if rc == 0 else f"FAILED (exit {rc}, see logs/{c.name}.log)"
        print(f"  {c.name:22s} {status} in {seconds:.0f} s", flush=True)
        return c, rc, seconds

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(launch, todo))
    failed = [c.name for c, rc, _ in results if rc != 0]
    header = (
        f"# Strategy comparison: {args.config}\n\n"
        f"`scaling-abs compare --config {args.config} --sizes {' '.join(map(str, sizes))} "
        f"--strategies {' '.join(strategies)} --jobs {args.jobs}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "".join(f" {o}" for o in args.overrides)
        + f"` at git {_git_revision()} on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPUs); "
        + (
            "tabulated with --report-only (no run started).\n"
            if args.report_only
            else f"this invocation ran {len(todo)} runs in {time.perf_counter() - t0:.0f} s.\n"
        )
    )
    # the runs as a user would type them (the grid runs them with this Python: sys.executable -m scaling_abs)
    (out / "commands.txt").write_text(
        "".join(shlex.join(["scaling-abs", *commands[c.name][3:]]) + "\n" for c in cells)
    )
    print(write_report(out, [c.name for c in cells], focus, base.batch_size, header))
    if failed:
        print(f"compare: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
