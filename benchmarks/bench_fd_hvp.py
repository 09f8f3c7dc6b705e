"""Why the curvature check does not use finite differences of gradients.

``H v ~ (g(w + h v) - g(w)) / h`` (forward) or ``(g(w + h v) - g(w - h v)) / 2h`` (central) costs one
or two training-step gradients per product instead of a double backward, and no kept graph. This
measures how far it is from the exact HVP (``curvature.hvp``, double backward) on the same model,
batch and unit vector, for a range of steps ``h``:

    .venv/bin/python benchmarks/bench_fd_hvp.py --out benchmarks/results/bench_fd_hvp_cpu.json
    .venv/bin/python benchmarks/bench_fd_hvp.py --models mlp cnn c1

Models and batches are ``bench_hvp.py``'s (``cnn`` on 512 images, BatchNorm in eval mode); fp32
and, for the ``mlp`` (tanh: smooth), fp64 as a control that the differences themselves are right.
On ReLU and max-pool networks the gradient jumps wherever a perturbation flips a unit or a pooling
choice; the exact (autograd) Hessian leaves those jumps out, a finite difference divides them by
``h``, so its error does not shrink with ``h``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_hvp import MODELS, _build  # noqa: E402

from scaling_abs.curvature import cross_entropy_loss, hvp  # noqa: E402

STEPS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
BATCH = {"cnn": 512}  # the embedded default's Hessian batch; others keep bench_hvp's


def _norm(xs) -> float:
    return float(sum((x.double() ** 2).sum() for x in xs) ** 0.5)


def measure(name: str, dtype: torch.dtype) -> list[dict]:
    model, (x, y) = _build(name, torch.device("cpu"), BATCH.get(name, 0))
    model = model.to(dtype).eval()
    batch = (x.to(dtype), y)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g, dtype=dtype) for p in params]
    n = _norm(v)
    v = [t / n for t in v]

    def grad_at(shift: float) -> list[torch.Tensor]:
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, v):
                p.add_(t, alpha=shift)
        out = torch.autograd.grad(cross_entropy_loss(model, batch), params)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return list(out)

    start = time.perf_counter()
    exact = hvp(model, cross_entropy_loss, batch, v, method="double_backward")
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    g0 = grad_at(0.0)
    grad_s = time.perf_counter() - start
    ref = _norm(exact)
    rows = []
    for h in STEPS:
        fwd = [(a - b) / h for a, b in zip(grad_at(h), g0)]
        plus, minus = grad_at(h), grad_at(-h)
        cen = [(a - b) / (2 * h) for a, b in zip(plus, minus)]
        row = {
            "model": name,
            "dtype": str(dtype).replace("torch.", ""),
            "h": h,
            "forward_rel_error": _norm([a - b for a, b in zip(fwd, exact)]) / ref,
            "central_rel_error": _norm([a - b for a, b in zip(cen, exact)]) / ref,
            "exact_hvp_s": exact_s,
            "gradient_s": grad_s,
        }
        rows.append(row)
        print(
            f"{name:9s} {row['dtype']:8s} h={h:<7g} forward {row['forward_rel_error']:9.2e}"
            f"  central {row['central_rel_error']:9.2e}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["mlp", "cnn"], choices=list(MODELS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.models:
        for dtype in (torch.float32, torch.float64) if name == "mlp" else (torch.float32,):
            rows.extend(measure(name, dtype))
    meta = {
        "command": " ".join(["benchmarks/bench_fd_hvp.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "machine": platform.node(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
