"""The trainer's host overhead per optimizer step, with and without the cached LOMO check
(``trainer.cache_lomo_check``): the MLP on Fashion-MNIST at batch 128 for one epoch (469 steps,
where the model's own work is about 2 ms a step on one CPU thread), rounds alternating the two
settings in one process; each round's median ``step_time_s`` from ``metrics.jsonl``, and a bare loop
over the same data and optimizer for scale.

    .venv/bin/python benchmarks/bench_trainer_overhead.py --rounds 5 --out benchmarks/results/bench_trainer_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import accelerate.accelerator
import accelerate.optimizer
import torch
import torch.nn.functional as F

from scaling_abs import versions
from scaling_abs.config import load_config
from scaling_abs.trainer import build_data_and_model, cache_lomo_check, train

ORIGINAL = accelerate.optimizer.is_lomo_available


def settings(out: Path) -> dict:
    return {
        "model": "mlp",
        "strategy": "bl",
        "epochs": 1,
        "batch_size": 128,
        "micro_batch_size": 512,
        "progress": False,
        "tensorboard": False,
        "eval_every": 1,
        "output_dir": str(out),
    }


def trainer_round(cached: bool, root: Path) -> float:
    """One training run; its median step time in ms."""
    for module in (accelerate.optimizer, accelerate.accelerator):
        module.is_lomo_available = ORIGINAL  # the trainer caches it again when asked
    out = root / ("cached" if cached else "plain")
    shutil.rmtree(out, ignore_errors=True)
    if not cached:  # Trainer calls cache_lomo_check(): keep it from doing so for this round
        import scaling_abs.trainer as trainer_module

        saved, trainer_module.cache_lomo_check = trainer_module.cache_lomo_check, lambda: None
    try:
        train(load_config(None, settings(out)))
    finally:
        if not cached:
            trainer_module.cache_lomo_check = saved
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return 1000 * statistics.median(r["step_time_s"] for r in steps if r["kind"] == "step")


def bare_loop_ms(root: Path) -> float:
    """The same model, data order aside, optimizer and batch without the trainer: ms a step."""
    data, model = build_data_and_model(load_config(None, settings(root / "bare")))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images, targets = data.train.images, data.train.targets
    start, n = time.perf_counter(), 0
    for i in range(0, len(images) - 127, 128):
        loss = F.cross_entropy(model(images[i : i + 128].float().div_(255)), targets[i : i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # the trainer reads its loss every step too
        n += 1
    return 1000 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="trainer_overhead_"))
    rows = {"plain": [], "cached": []}
    for _ in range(args.rounds):
        for cached in (False, True):
            rows["cached" if cached else "plain"].append(trainer_round(cached, root))
    bare = [bare_loop_ms(root) for _ in range(3)]
    cache_lomo_check()
    result = {
        "median_step_ms": {k: [round(v, 3) for v in vs] for k, vs in rows.items()},
        "median_of_rounds_ms": {k: round(statistics.median(vs), 3) for k, vs in rows.items()},
        "bare_loop_ms": [round(v, 3) for v in bare],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": 1},
        "versions": versions(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
