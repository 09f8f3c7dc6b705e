"""How exact is each HVP path on this machine? Every method, precision and memory setting against an
fp64 reference on the same model, batch and vector, and the top eigenvalue in fp32 and bf16 against
fp64.

    .venv/bin/python benchmarks/bench_hvp_accuracy.py                      # cnn and vit_tiny
    .venv/bin/python benchmarks/bench_hvp_accuracy.py --models c1 vit_tiny # on a GPU: ResNet-18 too

The models and batches are ``bench_hvp.py``'s (seeded weights, random inputs, BatchNorm in eval
mode as the paper's code). The reference is ``hvp(method="double_backward")`` on an fp64 copy of the
model and batch; each row is ``||Hv - Hv_ref|| / ||Hv_ref||`` for one way of computing ``Hv``:

  double_backward, forward_over_reverse, auto   the methods of ``curvature.hvp`` (fp32)
  rules, stock_rules  double backward with our second-order rules for convolutions and eval-mode
                      BatchNorm forced on / off (custom_rules=True / False; default: on for the CPU
                      and CUDA in fp32)
  reused_graph        the power iteration's product: the gradient graph built once, differentiated again
  micro4              the mean loss over 4 micro-batches, each with its own graph
  checkpointed        every block under non-reentrant activation checkpointing
  bf16, fp16          autocast (fp16 with the loss scale), fp32 vectors

On CUDA the fp32 rows are measured three times: with PyTorch's defaults (TF32 for cuDNN
convolutions, not for matmuls), with TF32 on for both, and with TF32 off for both. (The results in
``results/gpu/`` predate this: their "tf32 default" rows had TF32 on for both.) Eigenvalues: 10 power iterations (tol 0) from the same seeded start. The issue's
bars: fp32 within 1e-5, bf16 within 2e-2, the bf16 eigenvalue within 2 % of fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_hvp import MODELS, _build, checkpoint_blocks  # noqa: E402
from trainer_bench import git_revision  # noqa: E402

from scaling_abs.curvature import (  # noqa: E402
    HessianOperator,
    _checking,
    cross_entropy_loss,
    hvp,
    top_eigenvalue,
)

FP32_ROWS = (
    "double_backward",
    "forward_over_reverse",
    "auto",
    "rules",
    "stock_rules",
    "reused_graph",
    "micro4",
    "checkpointed",
)


def _rel(a, b) -> float:
    num = sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b)) ** 0.5
    den = sum((y.double() ** 2).sum() for y in b) ** 0.5
    return float(num / den)


@contextlib.contextmanager
def _tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _product(row: str, model, batch, v):
    """One HVP the way ``row`` names it (fp32 model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if row in ("double_backward", "forward_over_reverse", "auto"):
        return hvp(model, cross_entropy_loss, batch, v, method=row)
    if row in ("rules", "stock_rules"):
        rules = row == "rules"
        return hvp(model, cross_entropy_loss, batch, v, method="double_backward", custom_rules=rules)
    if row in ("bf16", "fp16"):
        dtype = torch.bfloat16 if row == "bf16" else torch.float16
        return hvp(model, cross_entropy_loss, batch, v, method="double_backward", autocast_dtype=dtype)
    if row == "checkpointed":
        model = copy.deepcopy(model)
        if checkpoint_blocks(model) == 0:
            raise RuntimeError("no blocks to checkpoint in this model")
        return hvp(model, cross_entropy_loss, batch, v, method="double_backward")
    x, y = batch
    batches = [batch] if row == "reused_graph" else [(x[i::4], y[i::4]) for i in range(4)]
    with _checking(model, "eval", True):  # what top_eigenvalue runs its operator in (math attention)
        op = HessianOperator(model, cross_entropy_loss, batches, params, reuse_graph=row == "reused_graph")
        op(v)  # the graph is built at the first product; the second one is the reused product
        return op(v)


def measure(name: str, device: torch.device) -> list[dict]:
    model, batch = _build(name, device)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g).to(device) for p in params]
    ref_model = copy.deepcopy(model).double()
    ref_batch = (batch[0].double(), batch[1])
    with _tf32(False):
        ref = hvp(ref_model, cross_entropy_loss, ref_batch, [x.double() for x in v], method="double_backward")
        eig_ref = top_eigenvalue(ref_model, cross_entropy_loss, [ref_batch], max_iter=10, tol=0.0, seed=0)
    settings = [("defaults", None)]  # PyTorch's own: on CUDA, TF32 for cuDNN convolutions, not for matmuls
    if device.type == "cuda":
        settings += [("tf32 on", True), ("tf32 off", False)]
    rows = []
    for label, tf32 in settings:

        def ctx(tf32=tf32):  # a fresh context manager for every use
            return _tf32(tf32) if tf32 is not None else contextlib.nullcontext()

        for row in (*FP32_ROWS, "bf16", "fp16") if label == "defaults" else FP32_ROWS:
            with ctx():
                try:
                    out = _product(row, model, batch, v)
                    rows.append({"model": name, "setting": label, "row": row, "rel_error": _rel(out, ref)})
                except Exception as e:  # a path that cannot run on this model is a result too
                    rows.append(
                        {
                            "model": name,
                            "setting": label,
                            "row": row,
                            "error": f"{type(e).__name__}: {e}"[:160],
                        }
                    )
        for dtype, tag in ((None, "eig_fp32"), (torch.bfloat16, "eig_bf16")):
            with ctx():
                r = top_eigenvalue(
                    model, cross_entropy_loss, [batch], max_iter=10, tol=0.0, seed=0, autocast_dtype=dtype
                )
            rows.append(
                {
                    "model": name,
                    "setting": label,
                    "row": tag,
                    "eigenvalue": r.eigenvalue,
                    "eigenvalue_fp64": eig_ref.eigenvalue,
                    "rel_error": abs(r.eigenvalue / eig_ref.eigenvalue - 1),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["cnn", "vit_tiny"], choices=list(MODELS))
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/bench_hvp_accuracy_<device>.json)"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in args.models:
        for r in measure(name, device):
            rows.append(r)
            what = r.get("error") or f"relative error {r['rel_error']:.2e}"
            if "eigenvalue" in r:
                what += f"  (eigenvalue {r['eigenvalue']:.6g}, fp64 {r['eigenvalue_fp64']:.6g})"
            print(f"{r['model']:9s} {r['setting']:13s} {r['row']:22s} {what}", flush=True)
    meta = {
        "command": " ".join(["benchmarks/bench_hvp_accuracy.py", *sys.argv[1:]]),
        "machine": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "git_revision": git_revision(),
    }
    out = Path(args.out or HERE / "results" / f"bench_hvp_accuracy_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
