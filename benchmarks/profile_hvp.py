"""Where a kept-graph HVP spends its time: ``torch.profiler`` over one product (CPU), with our
second-order rules and with PyTorch's: the autograd nodes with the largest share of the product,
then the convolution kernels grouped by input shape.

    .venv/bin/python benchmarks/profile_hvp.py --batch 32               # ResNet-18
    .venv/bin/python benchmarks/profile_hvp.py --model cnn --batch 512  # the embedded default's check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hvp import _build  # noqa: E402

from scaling_abs.curvature import HessianOperator, cross_entropy_loss  # noqa: E402

KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="c1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    for rules in (False, True):
        model, batch = _build(args.model, torch.device("cpu"), args.batch)
        model.eval()
        params = list(model.parameters())
        g = torch.Generator().manual_seed(2)
        v = [torch.randn(p.shape, generator=g) for p in params]
        op = HessianOperator(model, cross_entropy_loss, [batch], params, reuse_graph=True, custom_rules=rules)
        op(v)  # builds the graph; the profiled product is the next one
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            op(v)
        events = prof.key_averages(group_by_input_shape=True)
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"\n== custom_rules={rules}: one product, {total:.0f} ms of self CPU time")
        nodes = [
            e
            for e in prof.key_averages()
            if e.key.endswith(("Backward0", "Backward1", "Backward")) and not e.key.startswith("autograd::")
        ]
        for e in sorted(nodes, key=lambda e: -e.cpu_time_total)[:5]:
            share = e.cpu_time_total / 1e3 / total
            print(f"{e.key:40s} calls {e.count:3d}  total {e.cpu_time_total / 1e3:7.1f} ms  ({share:.0%})")
        rows = sorted((e for e in events if e.key in KERNELS), key=lambda e: -e.self_cpu_time_total)
        for e in rows[: args.rows]:
            shapes = [s for s in e.input_shapes if s][:3]
            print(
                f"{e.key:28s} calls {e.count:3d}  self {e.self_cpu_time_total / 1e3:7.1f} ms"
                f"  ({e.self_cpu_time_total / 1e3 / e.count:5.1f} ms each)  {shapes}"
            )


if __name__ == "__main__":
    main()
