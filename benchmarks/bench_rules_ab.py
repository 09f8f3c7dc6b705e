"""Second-order rule sets side by side in one process: PyTorch's rules (and PyTorch's with the
model and data in the channels-last memory format), ours for convolutions and eval-mode BatchNorm
only, ours with ReLU and max pooling too, with eval-mode BatchNorm folded into the convolution
before it, and (the default) with 2-d convolutions in the channels-last memory format as well.
Each set adds one thing to the one before it. Rounds alternate between the sets, so a machine whose
speed drifts between processes (this 2-core one: 10-40 % from one run of
``bench_hvp.py`` to the next) moves all of them alike.

    .venv/bin/python benchmarks/bench_rules_ab.py --model cnn --batch 512 --rounds 8 \
        --out benchmarks/results/bench_rules_ab_cnn512.json
    .venv/bin/python benchmarks/bench_rules_ab.py --model c1 --batch 128 --rounds 2 \
        --sets pytorch pytorch_channels_last ours_nchw ours
    python3 benchmarks/bench_rules_ab.py --model c1 --batch 1024 --rounds 3 \
        --sets pytorch ours_no_fold ours_nchw ours   # on a GPU: the fold, then channels-last

Per round and set: one HVP on a kept gradient graph (the mean of 3 after the one that builds the
graph), one HVP from scratch (a new forward and backward: ``reuse_graph=False``) and a 10-product
power-iteration estimate (``tol=0``, the graph kept); medians over rounds.
The values must agree between the sets (the same Hessian; rounding aside).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_bench import git_revision  # noqa: E402

from scaling_abs import _second_order  # noqa: E402
from scaling_abs.curvature import HessianOperator, cross_entropy_loss, top_eigenvalue  # noqa: E402
from scaling_abs.models import build_model  # noqa: E402

SHAPES = {"mlp": (1, 28), "cnn": (1, 28), "vit_tiny": (1, 28), "c1": (3, 32)}
ALL_RULES = _second_order._rule


def _conv_bn_only(module: nn.Module):
    return None if isinstance(module, (nn.ReLU, nn.MaxPool2d)) else ALL_RULES(module)


FOLD = _second_order._folded
CHANNELS_LAST = _second_order._channels_last


def _no_fold(*args):
    return None


def _nchw(x, w):
    return x, w


SETS = {  # name: (custom_rules, which modules get ours, BatchNorm folding, our convolutions' layout,
    #               model and data in channels-last)
    "pytorch": (False, ALL_RULES, FOLD, CHANNELS_LAST, False),
    "pytorch_channels_last": (False, ALL_RULES, FOLD, CHANNELS_LAST, True),
    "ours_conv_bn": (True, _conv_bn_only, _no_fold, _nchw, False),
    "ours_no_fold": (True, ALL_RULES, _no_fold, _nchw, False),
    "ours_nchw": (True, ALL_RULES, FOLD, _nchw, False),
    "ours": (True, ALL_RULES, FOLD, CHANNELS_LAST, False),
}


def _timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    sets = {name: SETS[name] for name in SETS if name in args.sets}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    channels, size = SHAPES[args.model]
    model = build_model(args.model, num_classes=10, in_channels=channels, image_size=size).to(device)
    x = torch.rand(args.batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    model.train()(x)  # running statistics that are not 0 and 1
    model.eval()
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    rows = {name: {"product_s": [], "fresh_s": [], "estimate_s": [], "eigenvalue": None} for name in sets}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, (rules, rule, fold, layout, whole_model) in sets.items():
            _second_order._rule, _second_order._folded, _second_order._channels_last = rule, fold, layout
            fmt = torch.channels_last if whole_model else torch.contiguous_format
            model.to(memory_format=fmt)  # the same parameter objects, converted in place
            x = x.contiguous(memory_format=fmt)
            try:
                op = HessianOperator(model, cross_entropy_loss, [(x, y)], params, custom_rules=rules)
                op(v)  # builds the graph
                product, _ = _timed(lambda op=op: [op(v) for _ in range(3)], device)
                del op
                fresh_op = HessianOperator(
                    model, cross_entropy_loss, [(x, y)], params, custom_rules=rules, reuse_graph=False
                )
                fresh, _ = _timed(lambda op=fresh_op: op(v), device)
                del fresh_op
                estimate, res = _timed(
                    lambda rules=rules, x=x: top_eigenvalue(
                        model, cross_entropy_loss, [(x, y)], max_iter=10, tol=0.0, custom_rules=rules
                    ),
                    device,
                )
            finally:
                _second_order._rule, _second_order._folded = ALL_RULES, FOLD
                _second_order._channels_last = CHANNELS_LAST
            rows[name]["product_s"].append(product / 3)
            rows[name]["fresh_s"].append(fresh)
            rows[name]["estimate_s"].append(estimate)
            rows[name]["eigenvalue"] = res.eigenvalue
    results = []
    for name, r in rows.items():
        product, fresh, estimate = r["product_s"][1:], r["fresh_s"][1:], r["estimate_s"][1:]
        results.append(
            {
                "rules": name,
                "product_median_s": statistics.median(product),
                "product_min_s": min(product),
                "product_max_s": max(product),
                "fresh_median_s": statistics.median(fresh),
                "fresh_min_s": min(fresh),
                "fresh_max_s": max(fresh),
                "estimate_median_s": statistics.median(estimate),
                "estimate_min_s": min(estimate),
                "estimate_max_s": max(estimate),
                "eigenvalue": r["eigenvalue"],
            }
        )
        print(
            f"{args.model} {args.batch:5d} {name:21s} kept-graph product "
            f"{1e3 * results[-1]['product_median_s']:8.1f} ms [{1e3 * min(product):.1f}-{1e3 * max(product):.1f}]"
            f"   fresh product {1e3 * results[-1]['fresh_median_s']:8.1f} ms"
            f" [{1e3 * min(fresh):.1f}-{1e3 * max(fresh):.1f}]"
            f"   10-product estimate {1e3 * results[-1]['estimate_median_s']:8.1f} ms"
            f" [{1e3 * min(estimate):.1f}-{1e3 * max(estimate):.1f}]   eigenvalue {r['eigenvalue']:.6g}",
            flush=True,
        )
    meta = {
        "command": " ".join(["benchmarks/bench_rules_ab.py", *sys.argv[1:]]),
        "machine": platform.node(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git_revision": git_revision(),
        "rounds": args.rounds,
        "sets": list(sets),
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
