"""How many samples does a curvature check need? The spread of the top eigenvalue over independent
Hessian batches of each size, on the same weights, along a real training run, with what each size
costs.

    .venv/bin/python benchmarks/bench_hessian_samples.py                          # demo preset, 4 epochs
    .venv/bin/python benchmarks/bench_hessian_samples.py --sizes 256 1024 --draws 6 epochs=2

The run trains with the given config (the demo preset: the embedded default with four checks an
epoch, unless overridden); its own checks drive the schedule as usual. At the checks named by
``--at`` (0 = the first), before the check, it draws ``--draws`` independent Hessian batches of
every size in ``--sizes`` from the training set (seeded, without replacement within a batch) and
estimates each one's top eigenvalue with Lanczos to a tight tolerance (up to 20 products, tol 1e-4),
so the spread is the batch's and not the solver's. Per (check, size): mean, coefficient of variation
(std / mean), max / min, and seconds per estimate.

Why it matters: ABS grows the batch when a check's estimate is <= 1/alpha (1/2) of the reference
estimate. Two estimates of the *same* curvature that differ by a factor of 2 look like a real drop.
Output: a table on stdout and a JSON file with every estimate and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_bench import run_record, timed_estimate  # noqa: E402

from scaling_abs import curvature  # noqa: E402
from scaling_abs.config import load_config, parse_overrides  # noqa: E402
from scaling_abs.trainer import Trainer  # noqa: E402


class SamplingTrainer(Trainer):
    """A Trainer that, at chosen checks, first measures the eigenvalue over fresh Hessian batches."""

    def __init__(self, cfg, sizes: list[int], draws: int, at: set[int]):
        super().__init__(cfg)
        self.sizes, self.draws, self.at = sizes, draws, at
        self.rows: list[dict] = []

    def _check(self):
        if self.state.checks in self.at:
            params = curvature.resolve_block(self.raw_model, self.cfg.hessian_block)
            row = {"check": self.state.checks, "epoch": self.epoch, "sizes": {}}
            for n in self.sizes:
                values, seconds, products = [], [], []
                for d in range(self.draws):
                    batches = self._hessian_batches(n, seed=10_000 * (self.state.checks + 1) + 100 * d + n)
                    res, secs = timed_estimate(
                        self, batches, params, max_iter=20, tol=1e-4, seed=d, solver="lanczos"
                    )
                    seconds.append(secs)
                    values.append(res.eigenvalue)
                    products.append(res.iterations)
                mean = statistics.fmean(values)
                row["sizes"][str(n)] = {
                    "eigenvalues": values,
                    "products": products,
                    "seconds": seconds,
                    "mean": mean,
                    "cv": statistics.stdev(values) / abs(mean) if len(values) > 1 else 0.0,
                    "max_over_min": max(values) / min(values) if min(values) > 0 else float("nan"),
                }
                print(
                    f"check {self.state.checks:2d} (epoch {self.epoch:4.2f}) n={n:5d}: mean {mean:8.3f}"
                    f"  cv {row['sizes'][str(n)]['cv']:6.1%}  max/min {row['sizes'][str(n)]['max_over_min']:5.2f}"
                    f"  {statistics.fmean(seconds):6.2f} s per estimate",
                    flush=True,
                )
            self.rows.append(row)
        return super()._check()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="train key=value overrides")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--draws", type=int, default=5, help="independent Hessian batches per size")
    parser.add_argument(
        "--at", type=int, nargs="+", default=[0, 7, 15], help="checks to measure at (0 = first)"
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_hessian_samples.json"))
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error("--draws must be >= 2 (a spread needs two estimates)")
    overrides = {"epochs": 4, "progress": False, "tensorboard": False, **parse_overrides(args.overrides)}
    overrides.setdefault("output_dir", str(ROOT / "runs" / "bench_hessian_samples"))
    cfg = load_config("demo", overrides)  # the demo: four checks an epoch
    trainer = SamplingTrainer(cfg, args.sizes, args.draws, set(args.at))
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if not trainer.rows:
        sys.exit(
            f"bench_hessian_samples: the run made {summary['curvature_checks']} checks; none of --at reached"
        )
    by_size = {
        str(n): {
            "median_cv": statistics.median(r["sizes"][str(n)]["cv"] for r in trainer.rows),
            "max_cv": max(r["sizes"][str(n)]["cv"] for r in trainer.rows),
            "max_over_min": max(r["sizes"][str(n)]["max_over_min"] for r in trainer.rows),
            "seconds_per_estimate": statistics.fmean(
                s for r in trainer.rows for s in r["sizes"][str(n)]["seconds"]
            ),
        }
        for n in args.sizes
    }
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    result = run_record(f"benchmarks/bench_hessian_samples.py {argv_text}", overrides, summary)
    result.update({"by_size": by_size, "checks": trainer.rows})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'samples':>7} {'median cv':>9} {'max cv':>7} {'max/min':>7} {'s/estimate':>10}")
    for n, s in by_size.items():
        print(
            f"{n:>7} {s['median_cv']:>9.1%} {s['max_cv']:>7.1%} {s['max_over_min']:>7.2f}"
            f" {s['seconds_per_estimate']:>10.2f}"
        )
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
