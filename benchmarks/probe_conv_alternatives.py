"""Five ways past the convolution floor of ``probe_conv_floor.py``, tried on ResNet-18's shapes.

An exact product makes six convolutions per layer, in pairs whose results are added: the output's
tangent ``conv(dx, W) + conv(x, V)``, the input gradient's ``A(dg, W) + A(g, V)`` and the weight
gradient's ``B(dg, x) + B(g, dx)``. ``probe_conv_floor.py`` found ours already spends 0.62x classic's
time in those calls alone, so 0.5x needs faster kernels or fewer multiply-adds. Five candidates:

* Winograd: NNPACK (built into PyTorch's CPU wheels, ``torch._nnpack_spatial_convolution``) computes a
  stride-1 3x3 convolution with fewer multiplies than the direct method oneDNN uses. Compared with
  ``F.conv2d`` in NCHW and channels-last (what our rules run), with each one's relative error
  against fp64.
* Merged pairs: a pair that is added can be one call of twice the size, the forward pair over
  concatenated channels (``conv(cat(dx, x), cat(W, V))``) and the weight-gradient pair over
  concatenated images. Bigger calls may run closer to the machine's peak; the concatenations cost
  copies. Timed with the copies and without (inputs concatenated beforehand).
* Pairs at once: the two calls of a pair are independent, so they can run at the same time, each
  on one of the two cores (two worker threads with one intra-op thread each), instead of one after
  the other with two threads each. Small maps may use two threads poorly.
* Weight gradients as nine shifted matrix products (:func:`shifted_weight_grad`): no im2col copies,
  at the price of the padded grid's extra rows.
* Weight gradients as matrix products: oneDNN's weight-gradient kernel runs well below its forward
  kernel's rate on small feature maps (ResNet-18's 512 channels on 4x4 maps: 29 against 69 G
  multiply-adds a second in a product). :func:`matmul_weight_grad` computes it as one matrix
  product (im2col: every output position's input patch, copied). ``--models`` records every
  weight-gradient call of one product on each model and times both ways per call shape, then
  times whole kept-graph products with our rules' weight gradients on maps of at most
  ``--max-positions`` output positions sent to the matrix product, alternating with the rules as
  they are.

The first four on ResNet-18's (CIFAR) stride-1 3x3 convolutions at 128 images, channels-last unless
said, fp32. Rounds alternate between the timings of a shape; medians over rounds after a warm-up
round. The glibc setting the trainer uses on a CPU (``cpu_malloc``) is on.

    .venv/bin/python benchmarks/probe_conv_alternatives.py --rounds 7 \
        > benchmarks/results/probe_conv_alternatives_cpu.txt
    .venv/bin/python benchmarks/probe_conv_alternatives.py --rounds 5 --models c1:128 \
        > benchmarks/results/probe_weight_grad_cpu_resnet18.txt
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_hvp import _build  # noqa: E402
from probe_conv_floor import Recorder, _timed  # noqa: E402
from trainer_bench import cpu_model, git_revision  # noqa: E402

from scaling_abs import _malloc, _second_order  # noqa: E402
from scaling_abs.curvature import HessianOperator, cross_entropy_loss, hvp  # noqa: E402

CL = torch.channels_last
SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))  # (channels, height = width) of the four stages


PADDED_3X3 = ([1, 1], [1, 1], [1, 1], 1)  # (stride, padding, dilation, groups) of a stage's convolution


def _weight_grad(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conf=PADDED_3X3) -> torch.Tensor:
    """``B(g, x)``: oneDNN's weight gradient of ``conv(x, W)`` (groups 1), as training computes it."""
    stride, padding, dilation, _ = conf
    return torch.ops.aten.convolution_backward(
        g, x, w, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False]
    )[1]


def _one_thread_workers(count: int = 2) -> ThreadPoolExecutor:
    """``count`` worker threads that run PyTorch's kernels with one intra-op thread each, while the
    calling thread keeps its thread count. PyTorch keeps one process-wide count that each thread
    reads into its own (OpenMP's) at its first parallel call: a worker sets it to 1 and reads it at
    once, and the caller sets it back once every worker has."""
    threads = torch.get_num_threads()
    started = threading.Barrier(count)

    def one_thread() -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # this thread's first read: its own count is 1 from now on

    pool = ThreadPoolExecutor(count, initializer=one_thread)
    for future in [pool.submit(started.wait) for _ in range(count)]:
        future.result()
    torch.set_num_threads(threads)
    workers = [f.result() for f in [pool.submit(torch.get_num_threads) for _ in range(count)]]
    assert workers == [1] * count and torch.get_num_threads() == threads, (workers, threads)
    return pool


def _at_once(pool: ThreadPoolExecutor, first, second) -> torch.Tensor:
    """``first() + second()``, the two run at the same time on ``pool``'s workers."""
    a, b = pool.submit(first), pool.submit(second)
    return a.result() + b.result()


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _cases(batch: int, channels: int, size: int, pool: ThreadPoolExecutor) -> tuple[dict, dict]:
    """The timed calls of one shape, by name, and the relative error of each single convolution."""
    torch.manual_seed(0)
    x, dx = (torch.randn(batch, channels, size, size).contiguous(memory_format=CL) for _ in range(2))
    g, dg = (torch.randn(batch, channels, size, size).contiguous(memory_format=CL) for _ in range(2))
    w, v = (
        (torch.randn(channels, channels, 3, 3) / (3 * channels**0.5)).contiguous(memory_format=CL)
        for _ in range(2)
    )
    x_nchw, w_nchw, bias = x.contiguous(), w.contiguous(), torch.zeros(channels)
    xx, ww = torch.cat([dx, x], 1), torch.cat([w, v], 1)  # merged forward pair, copies made beforehand
    gg, xb = torch.cat([dg, g]), torch.cat([x, dx])  # merged weight-gradient pair
    cases = {
        "conv, NCHW": lambda: F.conv2d(x_nchw, w_nchw, None, 1, 1),
        "conv, channels-last (ours)": lambda: F.conv2d(x, w, None, 1, 1),
        "conv, NNPACK Winograd (NCHW)": lambda: torch._nnpack_spatial_convolution(
            x_nchw, w_nchw, bias, [1, 1]
        ),
        "forward pair, two calls (ours)": lambda: F.conv2d(dx, w, None, 1, 1) + F.conv2d(x, v, None, 1, 1),
        "forward pair, merged, with the copies": lambda: F.conv2d(
            torch.cat([dx, x], 1), torch.cat([w, v], 1), None, 1, 1
        ),
        "forward pair, merged, copies made before": lambda: F.conv2d(xx, ww, None, 1, 1),
        "forward pair, the two at once on one core each": lambda: _at_once(
            pool, lambda: F.conv2d(dx, w, None, 1, 1), lambda: F.conv2d(x, v, None, 1, 1)
        ),
        "weight gradient, oneDNN (ours)": lambda: _weight_grad(g, x, w),
        "weight gradient, nine shifted matrix products": lambda: shifted_weight_grad(g, x),
        "weight-gradient pair, two calls (ours)": lambda: _weight_grad(dg, x, w) + _weight_grad(g, dx, w),
        "weight-gradient pair, the two at once on one core each": lambda: _at_once(
            pool, lambda: _weight_grad(dg, x, w), lambda: _weight_grad(g, dx, w)
        ),
        "weight-gradient pair, merged, with the copies": lambda: _weight_grad(
            torch.cat([dg, g]), torch.cat([x, dx]), w
        ),
        "weight-gradient pair, merged, copies made before": lambda: _weight_grad(gg, xb, w),
    }
    ref = F.conv2d(x.double(), w.double(), None, 1, 1)
    errors = {
        "conv, NCHW": _relative_error(cases["conv, NCHW"](), ref),
        "conv, channels-last (ours)": _relative_error(cases["conv, channels-last (ours)"](), ref),
        "conv, NNPACK Winograd (NCHW)": _relative_error(cases["conv, NNPACK Winograd (NCHW)"](), ref),
    }
    wref = _weight_grad(g.double(), x.double(), w.double())
    for name in ("weight gradient, oneDNN (ours)", "weight gradient, nine shifted matrix products"):
        errors[name] = _relative_error(cases[name](), wref)
    pair = cases["forward pair, two calls (ours)"]().double()
    errors["forward pair, merged, copies made before"] = _relative_error(
        cases["forward pair, merged, copies made before"](), pair
    )
    errors["forward pair, the two at once on one core each"] = _relative_error(
        cases["forward pair, the two at once on one core each"](), pair
    )
    wpair = cases["weight-gradient pair, two calls (ours)"]().double()
    errors["weight-gradient pair, the two at once on one core each"] = _relative_error(
        cases["weight-gradient pair, the two at once on one core each"](), wpair
    )
    errors["weight-gradient pair, merged, copies made before"] = _relative_error(
        cases["weight-gradient pair, merged, copies made before"](), wpair
    )
    return cases, errors


def shifted_weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dL/dW`` of a stride-1 3x3 ``conv(x, W)`` with padding 1 as nine matrix products without
    im2col's copies: with ``x`` zero-padded and flattened channels-last over the padded grid, and
    ``g`` laid on that grid (zeros outside its maps), each kernel offset's input rows are one
    contiguous slice, ``W[:, :, i, j] = g_grid^T x_flat[offset:offset + rows]``. The price: the
    rows of the padded grid, (h + 2)(w + 2) against h w a map (2.25x at 4x4, 1.13x at 32x32)."""
    n, c_out, h, w = g.shape
    c_in = x.shape[1]
    width = w + 2
    rows = n * (h + 2) * width
    x_flat = x.new_zeros(rows + 2 * width + 2, c_in)  # the tail: the last offsets' slices
    x_flat[:rows].view(n, h + 2, width, c_in)[:, 1 : h + 1, 1 : w + 1] = x.permute(0, 2, 3, 1)
    g_grid = g.new_zeros(n, h + 2, width, c_out)
    g_grid[:, :h, :w] = g.permute(0, 2, 3, 1)
    g_t = g_grid.view(rows, c_out).t()
    out = x.new_empty(c_out, 3, 3, c_in)
    for i in range(3):
        for j in range(3):
            offset = i * width + j
            torch.mm(g_t, x_flat[offset : offset + rows], out=out[:, i, j])
    return out.permute(0, 3, 1, 2)


def matmul_weight_grad(g, x, w, conf) -> torch.Tensor:
    """``dL/dW`` of a 2-d ``conv(x, W)`` (groups 1) for output gradient ``g`` as one matrix
    product, ``g^T cols``, where ``cols`` holds every image's and output position's (padded,
    strided, dilated) input patch, channels-last: a copy of ``kh * kw`` times the input's memory.
    Returns channels-last strides, as oneDNN does for channels-last inputs."""
    stride, padding, dilation, _ = conf
    n, c = x.shape[:2]
    c_out, _, kh, kw = w.shape
    ho, wo = g.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    # (N, H + 2 ph, W + 2 pw, C); without padding F.pad may return the (NCHW input's) view itself
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)).contiguous()
    s_n, s_h, s_w, _ = xp.stride()
    patches = xp.as_strided((n, ho, wo, kh, kw, c), (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, 1))
    cols = patches.reshape(n * ho * wo, kh * kw * c)
    rows = g.permute(0, 2, 3, 1).reshape(n * ho * wo, c_out)
    return (rows.t() @ cols).view(c_out, kh, kw, c).permute(0, 3, 1, 2)


def _weight_grad_calls(model_name: str, batch: int) -> list[tuple]:
    """The distinct weight-gradient calls (g, x, w shapes and strides, conf) of one product from
    scratch on ``model_name`` with our rules (every one a ``convolution_backward``), with counts."""
    model, data = _build(model_name, torch.device("cpu"), batch)
    model.eval()
    v = [torch.randn_like(p) for p in model.parameters()]
    with Recorder() as rec:
        hvp(model, cross_entropy_loss, data, v)
    seen: dict = {}
    for func, args in rec.calls:
        if func is torch.ops.aten.convolution_backward.default and args[10][1] and not args[10][0]:
            g, x, w = args[:3]
            if len(w[1]) == 4 and args[9] == 1:
                key = (g[1:3], x[1:3], w[1:3], tuple(args[4]), tuple(args[5]), tuple(args[6]))
                seen[key] = seen.get(key, 0) + 1
    return [(*key, count) for key, count in seen.items()]


@contextlib.contextmanager
def matmul_weight_grads(max_positions: int):
    """Our rules' weight gradients (``_second_order._conv_backward``'s second output) on output
    maps of at most ``max_positions`` positions, fp32 and fp64, as :func:`matmul_weight_grad`."""
    original = _second_order._conv_backward

    def patched(g, x, w, conf, which):
        if (
            which == 1
            and x.dim() == 4
            and conf[3] == 1
            and x.dtype in (torch.float32, torch.float64)
            and g.shape[2] * g.shape[3] <= max_positions
        ):
            return matmul_weight_grad(g, x, w, conf)
        return original(g, x, w, conf, which)

    _second_order._conv_backward = patched
    try:
        yield
    finally:
        _second_order._conv_backward = original


def _in_situ(model_name: str, batch: int, rounds: int, max_positions: int) -> None:
    """Kept-graph products with the rules as they are and with small maps' weight gradients as
    matrix products, alternating (two products a round, after one that builds each graph)."""
    model, data = _build(model_name, torch.device("cpu"), batch)
    model.eval()
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    limits = {"oneDNN": -1, "matrix products": max_positions}  # -1: no map goes to matrix products
    ops, values = {}, {}
    for name, limit in limits.items():
        with matmul_weight_grads(limit):
            ops[name] = HessianOperator(model, cross_entropy_loss, [data], params)
            values[name] = torch.cat([t.flatten() for t in ops[name](v)])
    diff = _relative_error(values["matrix products"], values["oneDNN"].double())
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            with matmul_weight_grads(limits[name]):
                times[name].append(_ms(lambda op=op: [op(v) for _ in range(2)]) / 2)
    print(
        f"\n{model_name}, {batch} images: kept-graph products, weight gradients on maps of <= {max_positions} positions"
    )
    print(f"(products agree to {diff:.0e}); ms per product, median [min-max] over {rounds} rounds")
    for name, ts in times.items():
        print(f"  {name:20s} {statistics.median(ts):8.1f} [{min(ts):.1f}-{max(ts):.1f}]")
    ratio = statistics.median(times["matrix products"]) / statistics.median(times["oneDNN"])
    print(f"  matrix products / oneDNN: {ratio:.2f}x")


def _tensor(spec, gen) -> torch.Tensor:
    shape, stride = spec
    return torch.empty_strided(shape, stride).normal_(generator=gen)


def _weight_grads(model_name: str, batch: int, rounds: int) -> None:
    print(f"\n{model_name}, {batch} images: weight gradients of one product, per distinct call")
    print("| calls | input -> output, kernel, stride | output map | oneDNN ms | matrix products ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(0)
    totals = [0.0, 0.0]
    for g_spec, x_spec, w_spec, stride, padding, dilation, count in _weight_grad_calls(model_name, batch):
        g, x, w = (_tensor(s, gen) for s in (g_spec, x_spec, w_spec))
        conf = (list(stride), list(padding), list(dilation), 1)

        def onednn(g=g, x=x, w=w, conf=conf):
            return _weight_grad(g, x, w, conf)

        def gemm(g=g, x=x, w=w, conf=conf):
            return matmul_weight_grad(g, x, w, conf)

        err = _relative_error(gemm(), onednn().double())
        times: list[list[float]] = [[], []]
        for r in range(rounds + 1):
            for i, fn in enumerate((onednn, gemm)):
                ms = _ms(fn)
                if r:
                    times[i].append(ms)
        a, b = (statistics.median(t) for t in times)
        totals[0] += count * a
        totals[1] += count * b
        shape = f"{w_spec[0][1]} -> {w_spec[0][0]}, {w_spec[0][2]}x{w_spec[0][3]}, {stride[0]}"
        print(
            f"| {count} | {shape} | {g_spec[0][2]}x{g_spec[0][3]} | {a:.1f} | {b:.1f} | {b / a:.2f}x (err {err:.0e}) |"
        )
    print(f"| all | | | {totals[0]:.0f} | {totals[1]:.0f} | {totals[1] / totals[0]:.2f}x |")


def _ms(fn) -> float:
    return 1e3 * _timed(fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    ap.add_argument(
        "--models",
        nargs="*",
        default=[],
        metavar="MODEL:BATCH",
        help="time the weight gradients of these models' products instead (e.g. c1:128 cnn:512)",
    )
    ap.add_argument(
        "--max-positions", type=int, default=64, help="the largest map sent to matrix products in situ"
    )
    args = ap.parse_args()
    _malloc.tune()
    print(f"# benchmarks/probe_conv_alternatives.py {' '.join(sys.argv[1:])} (git {git_revision()})")
    print(
        f"# {cpu_model()}; {platform.platform()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if args.models:
        for spec in args.models:
            name, batch = spec.split(":")
            _weight_grads(name, int(batch), args.rounds)
            _in_situ(name, int(batch), args.rounds, args.max_positions)
        return
    print(
        f"# NNPACK available: {torch.backends.nnpack.is_available()}; batch {args.batch}, {args.rounds} rounds"
    )
    total: dict[str, float] = {}
    pool = _one_thread_workers()
    for channels, size in SHAPES:
        cases, errors = _cases(args.batch, channels, size, pool)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds + 1):
            for name, fn in cases.items():
                ms = _ms(fn)
                if r:
                    times[name].append(ms)
        print(f"\n{channels} channels, {size}x{size}: median ms [min-max], relative error")
        for name in cases:
            med = statistics.median(times[name])
            total[name] = total.get(name, 0.0) + med
            err = f"  err {errors[name]:.1e}" if name in errors else ""
            print(f"  {name:56s} {med:8.1f} [{min(times[name]):.1f}-{max(times[name]):.1f}]{err}")
    print("\nsum over the four stages (one call of each shape), ms")
    for name, ms in total.items():
        print(f"  {name:56s} {ms:8.1f}")


if __name__ == "__main__":
    main()
