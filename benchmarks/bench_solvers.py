"""Eigenvalue solvers and warm starts, measured along a real training run: how many Hessian-vector
products does each check take, and how far is its estimate from the top eigenvalue?

    .venv/bin/python benchmarks/bench_solvers.py                       # the demo preset, 4 epochs
    .venv/bin/python benchmarks/bench_solvers.py epochs=8 --out F.json # any train key=value

The run trains with the given config (the demo preset: the embedded default with four checks an
epoch, unless overridden); its own checks drive the schedule as usual (``hessian_warm_start`` as
configured). Before each check, on the same Hessian batch and weights, it also runs:

  power_cold    the paper's check: power iteration from a random start (the check's seed)
  power_warm    power iteration from :func:`scaling_abs.curvature.warm_start` of this variant's own
                previous eigenvector (random part of norm ``--noise``)
  lanczos_cold  Lanczos from the same random start
  lanczos_warm  Lanczos from its own previous eigenvector, warm-started the same way
  reference     Lanczos, up to 40 products, tol 1e-8: the value the others are compared with

each with the config's ``hessian_iters`` and ``hessian_tol``, and records each one's eigenvalue,
products (iterations) and seconds. The first check is left out of the summary (no previous vector:
every variant starts cold there). Output: a table on stdout and a JSON file with every check, the
summary (median and mean products, seconds, relative error against the reference) and the machine.
Seconds are indicative only: the variants run one after the other inside a training run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_bench import run_record, timed_estimate  # noqa: E402

from scaling_abs import curvature  # noqa: E402
from scaling_abs.config import load_config, parse_overrides  # noqa: E402
from scaling_abs.trainer import Trainer  # noqa: E402

VARIANTS = {  # name: (solver, warm start)
    "power_cold": ("power", False),
    "power_warm": ("power", True),
    "lanczos_cold": ("lanczos", False),
    "lanczos_warm": ("lanczos", True),
}


class MeasuringTrainer(Trainer):
    """A Trainer whose every check first measures the variants on the check's own batch."""

    def __init__(self, cfg, noise: float):
        super().__init__(cfg)
        self.noise = noise
        self.previous: dict[str, list[torch.Tensor] | None] = dict.fromkeys(VARIANTS)
        self.rows: list[dict] = []

    def _check(self):
        params = curvature.resolve_block(self.raw_model, self.cfg.hessian_block)
        batches = self._hessian_batches()
        row = {"check": self.state.checks, "epoch": self.epoch}
        ref, secs = timed_estimate(self, batches, params, max_iter=40, tol=1e-8, solver="lanczos")
        row["reference"] = {"eigenvalue": ref.eigenvalue, "iterations": ref.iterations, "seconds": secs}
        for name, (solver, warm) in VARIANTS.items():
            init = None
            if warm and self.previous[name] is not None:
                init = curvature.warm_start(
                    self.previous[name], params, seed=self.cfg.seed + self.state.checks, noise=self.noise
                )
            res, secs = timed_estimate(self, batches, params, init=init, solver=solver)
            self.previous[name] = res.eigenvector
            row[name] = {"eigenvalue": res.eigenvalue, "iterations": res.iterations, "seconds": secs}
        self.rows.append(row)
        record = super()._check()
        row["trained_with"] = {"eigenvalue": record["eigenvalue"], "iterations": record["iterations"]}
        return record


def _stats(rows: list[dict], name: str) -> dict:
    errors = [
        abs(r[name]["eigenvalue"] - r["reference"]["eigenvalue"]) / abs(r["reference"]["eigenvalue"])
        for r in rows
    ]
    return {
        "median_iterations": statistics.median(r[name]["iterations"] for r in rows),
        "mean_iterations": statistics.fmean(r[name]["iterations"] for r in rows),
        "total_seconds": sum(r[name]["seconds"] for r in rows),
        "median_rel_error": statistics.median(errors),
        "max_rel_error": max(errors),
    }


def summarize(rows: list[dict]) -> dict:
    """Per variant: over every check, and over checks 2.. (where the warm variants are warm)."""
    return {
        "all_checks": {name: _stats(rows, name) for name in VARIANTS},
        "after_first": {name: _stats(rows[1:], name) for name in VARIANTS} if len(rows) > 1 else {},
    }


def _table(summary: dict) -> str:
    lines = [
        f"{'variant':<13} {'median it':>9} {'mean it':>8} {'seconds':>8} {'median err':>11} {'max err':>8}"
    ]
    for name, s in summary.items():
        lines.append(
            f"{name:<13} {s['median_iterations']:>9} {s['mean_iterations']:>8.2f} {s['total_seconds']:>8.1f}"
            f" {s['median_rel_error']:>11.2e} {s['max_rel_error']:>8.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="train key=value overrides")
    parser.add_argument("--noise", type=float, default=0.5, help="warm_start's random part (norm)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_solvers.json"))
    args = parser.parse_args(argv)
    overrides = {"epochs": 4, "progress": False, "tensorboard": False, **parse_overrides(args.overrides)}
    overrides.setdefault("output_dir", str(ROOT / "runs" / "bench_solvers"))
    cfg = load_config("demo", overrides)  # the demo: four checks an epoch
    trainer = MeasuringTrainer(cfg, args.noise)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    result = run_record(f"benchmarks/bench_solvers.py {argv_text}", overrides, summary)
    result.update({"summary": summarize(trainer.rows), "checks": trainer.rows})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    n = len(trainer.rows)
    print(f"all {n} checks (the first is cold for every variant):")
    print(_table(result["summary"]["all_checks"]))
    if n > 1:
        print(f"checks 2..{n} (warm variants start from their previous eigenvector):")
        print(_table(result["summary"]["after_first"]))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
