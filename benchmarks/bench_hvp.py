"""Curvature cost, measured: a training step against one HVP (each method, precision and
checkpointing) and against a 10-iteration top-eigenvalue estimate, ours against the classic method
(PyHessian and the paper's code: the gradient graph built once with ``create_graph=True`` and
differentiated again every iteration) and against the ``pyhessian`` package itself.

    .venv/bin/python benchmarks/bench_hvp.py                          # every model, 3 runs each
    .venv/bin/python benchmarks/bench_hvp.py --models c1 --runs 3     # ResNet-18, 128 images 3x32x32
    .venv/bin/python benchmarks/bench_hvp.py --models c1 --batch 1024 # another batch for every model

What is timed: ``time.perf_counter`` around each call (``torch.cuda.synchronize`` on a GPU); one
warm-up call first, excluded (for the eigenvalue estimates the warm-up is a 1-iteration estimate);
median, min and max over ``--runs`` calls. Peak memory: each (model, measurement) runs in its own
child process; on the CPU the process's peak RSS (``ru_maxrss``) above its RSS after building the
model and data (glibc's heap keeps freed blocks, so this is the allocator's high-water mark;
``--exact-memory`` maps every block of 64 KiB and more on its own, so the RSS follows the live
tensors, at a cost in time), on a GPU ``torch.cuda.max_memory_allocated`` above what was allocated then. The JSON
records the machine, versions, thread count and git revision. Eigenvalue estimates run exactly 10
power iterations (``tol=0``) from the same seeded start vector, so their values must agree (Lanczos
excepted: its estimate after 10 products is closer to the top).

Measurements (all on the same model, batch and vector, BatchNorm in eval mode as the paper's code):
  train_step               forward + backward in train mode (what one SGD step costs, optimizer aside)
  hvp_double_backward      one HVP from scratch: forward, backward with create_graph, backward again
  hvp_double_backward_stock  the same with PyTorch's own second-order rules (custom_rules=False; in
                           fp32 the defaults use ours for convolutions and eval-mode BatchNorm)
  hvp_forward_over_reverse one HVP from scratch by torch.func.jvp of torch.func.grad
  hvp_bf16                 hvp_double_backward under bf16 autocast (fp32 vectors)
  hvp_bf16_stock / _rules  the same with PyTorch's rules / ours forced on (the default under autocast:
                           PyTorch's)
  hvp_checkpointed         hvp_double_backward with non-reentrant activation checkpointing per block
  hvp_segmented            one HVP with checkpoint=True: the model's chain recomputed piece by piece
                           (forward-mode tangents at the cuts, a double backward per piece)
  hvp_segmented_bf16       the same under bf16 autocast (hvp_segmented_bf16_stock: PyTorch's rules)
  hvp_reused               one HVP on a kept gradient graph (what each power iteration costs when reused)
  hvp_reused_stock         the same with PyTorch's own second-order rules (custom_rules=False)
  hvp_reused_rules         the same with ours forced on (custom_rules=True; the default in fp32)
  hvp_compiled             torch.compile of the forward-over-reverse HVP (warm-up = compilation, in warmup_s)
  eig_ours                 top_eigenvalue with its defaults (one micro-batch: the graph is reused)
  eig_ours_stock           eig_ours with PyTorch's own second-order rules (custom_rules=False)
  eig_ours_rules           eig_ours with ours forced on (custom_rules=True)
  eig_ours_fresh           top_eigenvalue, reuse_graph=False (a new forward/backward every iteration)
  eig_ours_micro4          top_eigenvalue over 4 micro-batches, fresh: the memory-saving setting
  eig_ours_lanczos         top_eigenvalue, solver="lanczos": the same 10 products plus reorthogonalisation
                           (its value is the top Ritz value, so it differs from the power iteration's)
  eig_ours_bf16            top_eigenvalue under bf16 autocast (fp32 vectors and reductions), graph reused
  eig_ours_bf16_stock / _rules  the same with PyTorch's rules / ours forced on
  eig_ours_checkpointed    top_eigenvalue with every block checkpointed (non-reentrant), graph reused
  eig_ours_segmented       top_eigenvalue with checkpoint=True (every product recomputed piece by piece)
  eig_classic              PyHessian's algorithm, written here (one graph, differentiated 10 times)
  eig_pyhessian            the pyhessian package (pip install pyhessian), when installed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_bench import cpu_model, git_revision  # noqa: E402  (beside this script)

from scaling_abs.curvature import (  # noqa: E402
    HessianOperator,
    cross_entropy_loss,
    hvp,
    top_eigenvalue,
)
from scaling_abs.models import build_model  # noqa: E402

MODELS = {  # name: (classes, channels, size, batch)
    "mlp": (10, 1, 28, 128),
    "cnn": (10, 1, 28, 128),
    "vit_tiny": (10, 1, 28, 128),
    "c1": (10, 3, 32, 128),  # ResNet-18, CIFAR variant: the 128 images of 3x32x32
}
MEASUREMENTS = [
    "train_step",
    "hvp_double_backward",
    "hvp_double_backward_stock",
    "hvp_forward_over_reverse",
    "hvp_bf16",
    "hvp_bf16_stock",
    "hvp_bf16_rules",
    "hvp_checkpointed",
    "hvp_segmented",
    "hvp_segmented_bf16",
    "hvp_segmented_bf16_stock",
    "hvp_reused",
    "hvp_reused_stock",
    "hvp_reused_rules",
    "hvp_compiled",
    "eig_ours",
    "eig_ours_stock",
    "eig_ours_rules",
    "eig_ours_fresh",
    "eig_ours_micro4",
    "eig_ours_lanczos",
    "eig_ours_bf16",
    "eig_ours_bf16_stock",
    "eig_ours_bf16_rules",
    "eig_ours_checkpointed",
    "eig_ours_segmented",
    "eig_ours_segmented_bf16",
    "eig_classic",
    "eig_pyhessian",
]
ITERS = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def classic_top_eigenvalue(model, batch, max_iter=ITERS, seed=0):
    """PyHessian's way: one graph with create_graph=True, differentiated again each iteration.
    Same seeded start vector and Rayleigh quotient as ours, so the values can be compared."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = cross_entropy_loss(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    eig = float("nan")
    for _ in range(max_iter):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eig = float(sum((h * x).sum() for h, x in zip(hv, v)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        v = [h / norm for h in hv]
    return eig


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap every residual / transformer block (a child of a Sequential or ModuleList that has
    parameters in several modules) in non-reentrant activation checkpointing; returns the count."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for parent in model.modules():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        for child in parent.children():
            owners = [m for m in child.modules() if any(True for _ in m.parameters(recurse=False))]
            if len(owners) >= 2:
                forward = child.forward
                child.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
                count += 1
    return count


def _build(name: str, device: torch.device, batch: int = 0):
    classes, channels, size, default_batch = MODELS[name]
    batch = batch or default_batch
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, in_channels=channels, image_size=size).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, channels, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    return model, (x, y)


RULE_VARIANTS = {"_stock": {"custom_rules": False}, "_rules": {"custom_rules": True}}


def _rule_variant(what: str) -> tuple[str, dict]:
    """``"hvp_reused_stock"`` -> ``("hvp_reused", {"custom_rules": False})``; others as they are."""
    for suffix, kw in RULE_VARIANTS.items():
        if what.endswith(suffix):
            return what[: -len(suffix)], kw
    return what, {}


def _calls(what: str, model: nn.Module, batch, device):
    """(warm-up call, timed call) for one measurement."""
    what, rules = _rule_variant(what)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g).to(device) for p in params]
    x, y = batch
    micro4 = list(zip(x.tensor_split(4), y.tensor_split(4)))  # 4 near-equal micro-batches
    model.eval()

    def train_step():
        model.train()
        model.zero_grad(set_to_none=True)
        cross_entropy_loss(model, batch).backward()
        model.eval()

    def eig(n, batches=(batch,), **kw):
        return lambda: top_eigenvalue(model, cross_entropy_loss, list(batches), max_iter=n, tol=0.0, **kw)

    if what == "train_step":
        return train_step, train_step
    hvp_kwargs = {
        "hvp_double_backward": {"method": "double_backward"},
        "hvp_checkpointed": {"method": "double_backward"},
        "hvp_forward_over_reverse": {"method": "forward_over_reverse"},
        "hvp_bf16": {"method": "double_backward", "autocast_dtype": torch.bfloat16},
        "hvp_segmented": {"checkpoint": True},
        "hvp_segmented_bf16": {"checkpoint": True, "autocast_dtype": torch.bfloat16},
    }
    if what in hvp_kwargs:
        if what == "hvp_checkpointed" and checkpoint_blocks(model) == 0:
            raise RuntimeError("no blocks to checkpoint in this model")

        def one_hvp():
            return hvp(model, cross_entropy_loss, batch, v, **hvp_kwargs[what], **rules)

        return one_hvp, one_hvp
    if what == "hvp_compiled":
        from torch.func import functional_call, grad, jvp

        buffers = dict(model.named_buffers())
        primals = {n: p.detach() for n, p in model.named_parameters()}
        tangents = dict(zip(primals, v))

        def loss_of(p):
            return cross_entropy_loss(lambda inp: functional_call(model, {**p, **buffers}, (inp,)), batch)

        compiled = torch.compile(lambda p, t: jvp(grad(loss_of), (p,), (t,))[1])

        def call():
            return list(compiled(primals, tangents).values())

        return call, call
    if what == "hvp_reused":
        op = HessianOperator(model, cross_entropy_loss, [batch], params, reuse_graph=True, **rules)
        return (lambda: op(v)), (lambda: op(v))  # the warm-up builds the graph
    if what == "eig_ours":
        return eig(1, **rules), eig(ITERS, **rules)
    if what == "eig_ours_fresh":
        return eig(1, reuse_graph=False), eig(ITERS, reuse_graph=False)
    if what == "eig_ours_micro4":
        return eig(1, batches=micro4, reuse_graph=False), eig(ITERS, batches=micro4, reuse_graph=False)
    if what == "eig_ours_lanczos":
        return eig(1, solver="lanczos"), eig(ITERS, solver="lanczos")
    if what == "eig_ours_bf16":
        bf16 = {"autocast_dtype": torch.bfloat16, **rules}
        return eig(1, **bf16), eig(ITERS, **bf16)
    if what == "eig_ours_checkpointed":
        if checkpoint_blocks(model) == 0:
            raise RuntimeError("no blocks to checkpoint in this model")
        return eig(1, reuse_graph=True), eig(ITERS, reuse_graph=True)
    if what == "eig_ours_segmented":
        return eig(1, checkpoint=True, **rules), eig(ITERS, checkpoint=True, **rules)
    if what == "eig_ours_segmented_bf16":  # the lean GPU path: checkpointed products under bf16
        lean = {"checkpoint": True, "autocast_dtype": torch.bfloat16, **rules}
        return eig(1, **lean), eig(ITERS, **lean)
    if what == "eig_classic":
        return (lambda: classic_top_eigenvalue(model, batch, 1)), (
            lambda: classic_top_eigenvalue(model, batch)
        )
    if what == "eig_pyhessian":
        from pyhessian import hessian  # optional: pip install pyhessian

        def run(n):
            h = hessian(model, nn.functional.cross_entropy, data=batch, cuda=device.type == "cuda")
            value = h.eigenvalues(maxIter=n, tol=0.0)[0][0]
            model.zero_grad(set_to_none=True)  # pyhessian leaves graph-carrying .grads behind
            return value

        return (lambda: run(1)), (lambda: run(ITERS))
    raise ValueError(what)


def _value(out) -> float | None:
    if hasattr(out, "eigenvalue"):
        return out.eigenvalue
    if isinstance(out, (int, float)):
        return float(out)
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return float(sum((h.float() * h.float()).sum() for h in out) ** 0.5)  # the HVP's norm
    return None


def child(name: str, what: str, runs: int, batch_size: int = 0) -> dict:
    """One measurement in this process: timings and peak memory above the post-build baseline."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, batch = _build(name, device, batch_size)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    # RuntimeWarnings are part of the result (a checkpointed product that fell back to two reverse
    # passes says so with one), not lines that gpu_checks.sh's warning filter would drop
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            warm, timed = _calls(what, model, batch, device)
            t0 = time.perf_counter()
            warm()
            _sync(device)
            warmup_s = time.perf_counter() - t0
        except Exception as e:  # a method that cannot run on this model is a result too
            return {"model": name, "measurement": what, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        times, out = [], None
        for _ in range(runs):
            _sync(device)
            t0 = time.perf_counter()
            out = timed()
            _sync(device)
            times.append(time.perf_counter() - t0)
    notes = sorted({str(w.message)[:240] for w in caught if issubclass(w.category, RuntimeWarning)})
    for w in caught:  # the others go where they went before
        if not issubclass(w.category, RuntimeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024  # KiB on Linux
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_cuda
    return {
        "model": name,
        "measurement": what,
        "batch": len(batch[1]),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": runs,
        "warmup_s": warmup_s,
        "peak_mem_bytes": peak,
        "value": _value(out),
        "device": device.type,
        **({"notes": notes} if notes else {}),
    }


def _ratio_rows(results: list[dict]) -> list[str]:
    """The issue's targets as ratios, per model."""
    by = {(r["model"], r["measurement"]): r for r in results if "error" not in r}
    rows = []
    for model in dict.fromkeys(r["model"] for r in results):

        def get(m, model=model):
            return by.get((model, m))

        classic, step, fp32 = get("eig_classic"), get("train_step"), get("eig_ours")
        for m in (m for m in MEASUREMENTS if m.startswith("eig_") and m != "eig_classic"):
            if classic and get(m):
                t = get(m)["median_s"] / classic["median_s"]
                mem = get(m)["peak_mem_bytes"] / max(classic["peak_mem_bytes"], 1)
                row = f"{model:9s} {m:26s} time {t:5.2f}x classic   peak memory {mem:5.2f}x classic"
                if (
                    m.startswith(("eig_ours_bf16", "eig_ours_checkpointed", "eig_ours_segmented"))
                    and fp32
                    and fp32.get("value")
                ):
                    row += f"   eigenvalue {get(m)['value'] / fp32['value'] - 1:+.2%} vs fp32"
                rows.append(row)
        for m in (
            "hvp_double_backward",
            "hvp_double_backward_stock",
            "hvp_forward_over_reverse",
            "hvp_reused",
            "hvp_reused_stock",
            "hvp_reused_rules",
            "hvp_compiled",
            "hvp_bf16",
            "hvp_bf16_stock",
            "hvp_bf16_rules",
            "hvp_segmented",
            "hvp_segmented_bf16",
        ):
            if step and get(m):
                rows.append(
                    f"{model:9s} {m:26s} {get(m)['median_s'] / step['median_s']:5.2f}x one training step"
                )
        for m in (
            "hvp_double_backward",
            "hvp_double_backward_stock",
            "hvp_reused",
            "hvp_reused_stock",
            "hvp_checkpointed",
            "hvp_segmented",
            "hvp_segmented_bf16",
            "hvp_bf16",
            "eig_ours_checkpointed",
            "eig_ours_segmented",
            "eig_ours_segmented_bf16",
        ):
            if step and get(m):
                mem = get(m)["peak_mem_bytes"] / max(step["peak_mem_bytes"], 1)
                rows.append(f"{model:9s} {m:26s} peak memory {mem:5.2f}x one training step")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--measurements", nargs="*", default=MEASUREMENTS, choices=MEASUREMENTS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="batch size for every model (0 = each one's own)")
    ap.add_argument("--child-timeout", type=float, default=1800, help="seconds per measurement")
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/bench_hvp_<device>.json)"
    )
    ap.add_argument(
        "--exact-memory",
        action="store_true",
        help="CPU: glibc maps every block >= 64 KiB on its own, so the peak RSS follows the live tensors "
        "(timings slower: measure time without it)",
    )
    ap.add_argument(
        "--cpu-malloc",
        action="store_true",
        help="glibc set as training sets it on the CPU (cpu_malloc=true: large blocks reused, not "
        "mapped afresh), in every measurement alike",
    )
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MEASUREMENT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.exact_memory and args.cpu_malloc:
        ap.error("--exact-memory and --cpu-malloc set glibc two ways: pick one")
    if args.child:
        if args.cpu_malloc:
            from scaling_abs import _malloc

            _malloc.tune()
        print(json.dumps(child(*args.child, args.runs, args.batch)))
        return
    # glibc keeps freed blocks below a moving threshold in the heap, so the peak RSS reads the
    # allocator's high-water mark, not the tensors': with a fixed 64 KiB threshold (--exact-memory)
    # every tensor of that size is its own mapping, returned at once, at a cost in time.
    env = dict(os.environ)
    if args.exact_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    results = []
    for name in args.models:
        for what in args.measurements:
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", name, what, "--runs", str(args.runs)]
                    + ["--batch", str(args.batch)]
                    + (["--cpu-malloc"] if args.cpu_malloc else []),
                    capture_output=True,
                    text=True,
                    timeout=args.child_timeout,
                    env=env,
                )
            except subprocess.TimeoutExpired:
                proc = subprocess.CompletedProcess([], 1, "", f"timeout: over {args.child_timeout:.0f} s")
            lines = proc.stdout.strip().splitlines()
            if lines:
                r = json.loads(lines[-1])
            else:
                tail = proc.stderr.strip().splitlines() or ["no output"]
                r = {"model": name, "measurement": what, "error": tail[-1][:200]}
            results.append(r)
            msg = r.get("error") or (
                f"{r['median_s'] * 1e3:10.1f} ms [{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}]"
                f"  peak +{r['peak_mem_bytes'] / 2**20:8.1f} MiB"
                + (f"  value {r['value']:.6g}" if r.get("value") is not None else "")
            )
            print(f"{name:9s} {what:26s} {msg}", flush=True)
            for note in r.get("notes", []):
                print(f"{'':9s} {'':26s} ! {note}", flush=True)
    ratios = _ratio_rows(results)
    print("\n".join(["", *ratios]))
    meta = {
        "command": " ".join(["benchmarks/bench_hvp.py", *sys.argv[1:]]),
        "machine": platform.node(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_revision": git_revision(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "runs": args.runs,
        "batch": args.batch or "each model's own",
        "iterations": ITERS,
        "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
        "cpu_malloc": args.cpu_malloc,
    }
    device = "cuda" if meta["cuda"] else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"bench_hvp_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
