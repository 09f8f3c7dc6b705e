"""A training step (train mode: forward, backward, SGD step) with the model and data in the default
NCHW memory format against channels-last, in one process, the layouts alternating round by round
(this 2-core machine's speed drifts 10-40 % between processes): the measurement behind the
``channels_last`` training option (``scaling-abs train channels_last=true``).

    .venv/bin/python benchmarks/bench_train_layout.py --model cnn --batch 512 --rounds 8 \
        --out benchmarks/results/bench_train_layout_cnn512.json

One-channel inputs are contiguous in both formats and read as NCHW unless their strides say
otherwise, so the channels-last data gets explicit channels-last strides (as our rules do).
The losses of the two layouts must agree (the same function; rounding aside).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_bench import git_revision  # noqa: E402

from scaling_abs._second_order import _nhwc  # noqa: E402
from scaling_abs.models import build_model  # noqa: E402

SHAPES = {"cnn": (1, 28), "c1": (3, 32)}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    channels, size = SHAPES[args.model]
    base = build_model(args.model, num_classes=10, in_channels=channels, image_size=size).to(device)
    x = torch.rand(args.batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    runs = {}
    for name, fmt in LAYOUTS.items():
        model = copy.deepcopy(base).to(memory_format=fmt).train()
        data = _nhwc(x) if fmt == torch.channels_last else x
        runs[name] = (model, data, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    losses: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, (model, data, opt) in runs.items():
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data), y)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())
    results = []
    for name in LAYOUTS:
        t = times[name][1:]
        results.append(
            {
                "layout": name,
                "step_median_s": statistics.median(t),
                "step_min_s": min(t),
                "step_max_s": max(t),
                "losses": losses[name],
            }
        )
        print(
            f"{args.model} {args.batch:5d} {name:13s} training step {1e3 * statistics.median(t):8.1f} ms"
            f" [{1e3 * min(t):.1f}-{1e3 * max(t):.1f}]   last loss {losses[name][-1]:.6f}",
            flush=True,
        )
    ratio = results[1]["step_median_s"] / results[0]["step_median_s"]
    print(f"channels-last / NCHW: {ratio:.2f}x")
    meta = {
        "command": " ".join(["benchmarks/bench_train_layout.py", *sys.argv[1:]]),
        "machine": platform.node(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git_revision": git_revision(),
        "rounds": args.rounds,
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
