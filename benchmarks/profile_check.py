"""Where a training run's curvature check spends its time, phase by phase.

Builds the trainer from the given settings (as ``scaling-abs train`` would), trains ``--steps``
optimizer steps so the weights are not the initial ones, then runs ``--checks`` checks exactly as
training does (``Trainer._check``: the Hessian batch's fetch, the estimate, the schedule's
observation) after one warm-up check, and times each phase with wrappers around the curvature
module's own functions (the GPU synchronised at each boundary, which removes overlap between
phases, so the sum can exceed a check without the wrappers a little):

  fetch     drawing and collating the Hessian batch (``Trainer._hessian_batches``)
  graph     building a micro-batch's kept gradient graph (forward + backward, ``create_graph``)
  product   one Hessian-vector product on a kept graph, or a fresh one (forward, backward and
            the second backward) when graphs are not kept
  rest      everything else in the check: state saving and restoring, the start vector,
            sums of micro-batches, the power iteration's dot products and host syncs

    .venv/bin/python benchmarks/profile_check.py                       # the embedded default
    python3 benchmarks/profile_check.py --config c1 dataset=fashion_mnist \
        hessian_samples=1024 hessian_reuse_graph=true data_dir=$FMNIST_DIR   # on a GPU

``--table N`` adds ``torch.profiler``'s N most expensive operators of the last check.
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_bench import git_revision  # noqa: E402

from scaling_abs import curvature  # noqa: E402
from scaling_abs.config import load_config  # noqa: E402
from scaling_abs.trainer import Trainer  # noqa: E402

PHASES = {  # phase: (object, attribute) wrapped
    "fetch": (Trainer, "_hessian_batches"),
    "graph": (curvature, "_gradient_graph"),
    "product": (curvature, "_hvp_from_graph"),
    "fresh product": (curvature, "_grad_and_hvp"),
}


class PhaseTimer:
    """Wraps each phase's function; ``seconds[phase]`` and ``calls[phase]`` add up while on."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self._originals = {}

    def _wrap(self, phase, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[phase] += time.perf_counter() - start
            self.calls[phase] += 1
            return out

        return timed

    def __enter__(self):
        for phase, (owner, name) in PHASES.items():
            self._originals[phase] = getattr(owner, name)
            setattr(owner, name, self._wrap(phase, self._originals[phase]))
        return self

    def __exit__(self, *exc):
        for phase, (owner, name) in PHASES.items():
            setattr(owner, name, self._originals[phase])

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="a preset or YAML file, as for scaling-abs train")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps before the checks")
    ap.add_argument("--checks", type=int, default=5, help="checks measured, after one warm-up")
    ap.add_argument("--table", type=int, default=0, help="also profile the last check: top N operators")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    overrides = ["progress=false", "tensorboard=false", "output_dir=/tmp/profile_check", *args.overrides]
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    device = trainer.accelerator.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(args.steps):
            plan = trainer.plan
            if trainer._loader_iter is None:
                trainer._set_plan(plan)
            trainer._train_step(plan, cfg.lr, 0.0)
        trainer._check()  # warm-up
        rows = []
        with PhaseTimer(device) as timer:
            for i in range(args.checks):
                timer.reset()
                profiler = None
                if args.table and i == args.checks - 1:
                    activities = [torch.profiler.ProfilerActivity.CPU]
                    if device.type == "cuda":
                        activities.append(torch.profiler.ProfilerActivity.CUDA)
                    profiler = torch.profiler.profile(activities=activities)
                    profiler.__enter__()
                sync()
                start = time.perf_counter()
                record = trainer._check()
                sync()
                total = time.perf_counter() - start
                if profiler is not None:
                    profiler.__exit__(None, None, None)
                rows.append((total, record["iterations"], dict(timer.seconds), dict(timer.calls)))
    finally:
        trainer.close()

    print(
        f"# {' '.join(['profile_check.py', *sys.argv[1:]])}\n"
        f"# model {cfg.model}, Hessian batch {cfg.hessian_samples} in micro-batches of "
        f"{cfg.hessian_micro_batch_size or cfg.micro_batch_size}, device {device}"
    )
    print("| check | products | total | " + " | ".join(PHASES) + " | rest |")
    print("| --- " * (4 + len(PHASES)) + "|")
    for i, (total, iters, seconds, calls) in enumerate(rows):
        cells = [f"{1e3 * seconds.get(p, 0):.0f} ms ({calls.get(p, 0)})" for p in PHASES]
        rest = total - sum(seconds.values())
        print(
            f"| {i + 1} | {iters} | {1e3 * total:.0f} ms | " + " | ".join(cells) + f" | {1e3 * rest:.0f} ms |"
        )
    products = sum(r[2].get("product", 0) + r[2].get("fresh product", 0) for r in rows)
    n = sum(r[3].get("product", 0) + r[3].get("fresh product", 0) for r in rows)
    total = sum(r[0] for r in rows)
    print(
        f"\nall {len(rows)} checks: {1e3 * total:.0f} ms, products {100 * products / total:.0f} % "
        f"({1e3 * products / max(n, 1):.1f} ms per micro-batch product), graphs "
        f"{100 * sum(r[2].get('graph', 0) for r in rows) / total:.0f} %, fetch "
        f"{100 * sum(r[2].get('fetch', 0) for r in rows) / total:.1f} %"
    )
    if args.table:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=args.table, max_name_column_width=48))
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    print(
        f"# {platform.node()} {name} torch {torch.__version__} threads {torch.get_num_threads()} git {git_revision()}"
    )


if __name__ == "__main__":
    main()
