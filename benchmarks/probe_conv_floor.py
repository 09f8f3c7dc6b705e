"""How close can a 10-product estimate get to classic on the CPU? The convolutions alone, replayed.

Issue 5 asks for ResNet-18's CPU estimate (128 images, 10 power iterations) at <= 0.5x the classic
method's time. Both do their work in convolutions, so this probe records every convolution call
(``aten.convolution`` and ``aten.convolution_backward``, with their shapes, memory formats and output
masks) of one 10-product estimate each way: ours (``top_eigenvalue``, defaults: kept graph, our
second-order rules, BatchNorm folded, channels-last) and classic (PyHessian's algorithm, from
``bench_hvp.py``). It then replays each recorded sequence on random tensors of the same shapes and
strides, with nothing else around them: the time of the convolutions themselves, a floor for
anything that makes the same calls. It also counts each sequence's multiply-adds (a convolution's
weight-gradient and input-gradient outputs each cost what its forward does).

Rounds alternate between the four timings (this machine's speed drifts between processes);
medians over rounds, the first round dropped as warm-up. The glibc setting the trainer uses on a
CPU (``cpu_malloc``) is on unless ``--no-cpu-malloc``.

    .venv/bin/python benchmarks/probe_conv_floor.py --rounds 3 \
        > benchmarks/results/probe_conv_floor_cpu_resnet18.txt
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_hvp import _build, classic_top_eigenvalue  # noqa: E402
from trainer_bench import git_revision  # noqa: E402

from scaling_abs import _malloc  # noqa: E402
from scaling_abs.curvature import cross_entropy_loss, top_eigenvalue  # noqa: E402

aten = torch.ops.aten
CONV_OPS = (aten.convolution.default, aten.convolution_backward.default)


def _spec(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype)
    if isinstance(a, (list, tuple)):
        return type(a)(_spec(b) for b in a)
    return a


class Recorder(TorchDispatchMode):
    """Every convolution call below autograd, its tensors kept as (shape, stride, dtype) only."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_OPS:
            self.calls.append((func, _spec(args)))
        return func(*args, **kwargs)


def multiply_adds(func, args) -> int:
    """A convolution's multiply-adds: batch x weight size x the positions of the non-transposed
    convolution's output; each input or weight gradient a convolution_backward computes costs the
    same (bias gradients are sums, left out)."""
    if func is aten.convolution.default:
        x, w, stride, padding, dilation, transposed = args[0], args[1], args[3], args[4], args[5], args[6]
        outputs = 1
        if transposed:
            positions = math.prod(x[1][2:])
        else:
            positions = math.prod(
                (size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, k, s, p, d in zip(x[1][2:], w[1][2:], stride, padding, dilation)
            )
    else:
        gy, x, w, transposed, mask = args[0], args[1], args[2], args[7], args[10]
        outputs = sum(bool(m) for m in mask[:2])
        positions = math.prod((x if transposed else gy)[1][2:])
    return outputs * x[1][0] * positions * math.prod(w[1])


class Replay:
    """The recorded calls on random tensors, one tensor per (shape, stride, dtype), made once."""

    def __init__(self, calls):
        self.calls = calls
        self.tensors: dict = {}
        gen = torch.Generator().manual_seed(0)
        for _, args in calls:
            for spec in self._specs(args):
                if spec not in self.tensors:
                    _, shape, stride, dtype = spec
                    t = torch.empty_strided(shape, stride, dtype=dtype)
                    self.tensors[spec] = t.normal_(generator=gen)

    def _specs(self, a):
        if isinstance(a, tuple) and a and a[0] == "tensor":
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                yield from self._specs(b)

    def _real(self, a):
        if isinstance(a, tuple) and a and a[0] == "tensor":
            return self.tensors[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._real(b) for b in a)
        return a

    def run(self) -> None:
        with torch.no_grad():
            for func, args in self.calls:
                func(*self._real(args))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="c1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-cpu-malloc", action="store_true")
    args = ap.parse_args()
    if not args.no_cpu_malloc:
        _malloc.tune()
    model, batch = _build(args.model, torch.device("cpu"), args.batch)
    model.eval()

    def ours():
        return top_eigenvalue(model, cross_entropy_loss, [batch], max_iter=10, tol=0.0).eigenvalue

    def classic():
        return classic_top_eigenvalue(model, batch)

    recorded = {}
    for name, fn in (("ours", ours), ("classic", classic)):
        with Recorder() as rec:
            value = fn()
        recorded[name] = rec.calls
        macs = sum(multiply_adds(f, a) for f, a in rec.calls)
        print(
            f"{name:8s} eigenvalue {value:.6g}: {len(rec.calls)} convolution calls, "
            f"{macs / 1e9:.1f} G multiply-adds",
            flush=True,
        )
    replays = {name: Replay(calls) for name, calls in recorded.items()}
    timings = {"ours": ours, "classic": classic}
    timings |= {f"{name}_convolutions_alone": replays[name].run for name in replays}
    times: dict[str, list[float]] = {name: [] for name in timings}
    for r in range(args.rounds + 1):
        for name, fn in timings.items():
            t = _timed(fn)
            if r:
                times[name].append(t)
            print(f"round {r} {name:28s} {t:7.2f} s", flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print()
    print(f"| {args.model}, {args.batch} images, 10 products | median | spread | / classic |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        print(
            f"| {name} | {med[name]:.2f} s | {min(ts):.2f}-{max(ts):.2f} s | {med[name] / med['classic']:.2f}x |"
        )
    print()
    share = med["ours_convolutions_alone"] / med["ours"]
    print(f"ours: convolutions alone are {100 * share:.0f} % of the estimate")
    print(
        f"# {platform.node()} {platform.machine()} torch {torch.__version__} threads {torch.get_num_threads()}"
        f" cpu_malloc {not args.no_cpu_malloc} git {git_revision()} rounds {args.rounds}"
    )


if __name__ == "__main__":
    main()
