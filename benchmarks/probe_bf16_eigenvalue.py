"""Top Hessian eigenvalue of a finished run's weights in fp32 and under bf16 autocast, side by side.

Why: the `c1` preset trained in bf16 on an H100/H200 read 1,800-2,178 at its third check where the fp32
run read 23. This tells a sharp point of the bf16-trained weights (fp32 agrees) from an artefact of
taking the products under bf16 (fp32 disagrees), and whether our second-order rules matter.

    python benchmarks/probe_bf16_eigenvalue.py RUN_DIR [--check 2] [--iters 20] [--out probe.json]
                                               [--variants fp32 bf16 bf16_stock_rules fp32_bn_train]

RUN_DIR holds `config.yaml` and `model.safetensors` (any finished `scaling-abs train` run). The Hessian
batch is the one the trainer drew for check number ``--check`` (0-based), over the run's
`hessian_block` with its solver, from a random start (a run with `hessian_warm_start=true` started
from the last eigenvector). The final weights are those of a check only if it came after the last
step. One process: a multi-process run's checks drew a batch divisible by the process count, and
models trained with augmentation get a fresh random augmentation of the same images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from scaling_abs import curvature
from scaling_abs.config import load_config
from scaling_abs.trainer import build_data_and_model, fetch_batches, hessian_draw


def _setup(run: Path, check: int, device: torch.device):
    from safetensors.torch import load_model

    cfg = load_config(str(run / "config.yaml"))
    data, model = build_data_and_model(cfg)
    load_model(model, str(run / "model.safetensors"))
    model.to(device)
    idx = hessian_draw(cfg, len(data.train), check)  # the trainer's draw for this check
    batches = fetch_batches(data.train, idx, cfg.hessian_micro_batch_size or cfg.micro_batch_size, device)
    return cfg, model, batches


def _bn_extremes(model: torch.nn.Module) -> dict:
    """Smallest running variance and largest |weight| / sqrt(var + eps) over eval-mode BatchNorms:
    a channel whose statistics collapsed multiplies its input's changes by the latter."""
    smallest, gain = float("inf"), 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            var = m.running_var.float()
            smallest = min(smallest, float(var.min()))
            w = m.weight.detach().float().abs() if m.weight is not None else torch.ones_like(var)
            gain = max(gain, float((w / torch.sqrt(var + m.eps)).max()))
    return {"min_running_var": smallest, "max_bn_gain": gain}


VARIANTS = {  # eig_<name> in the output: the products' settings beside the run's own
    "fp32": {},
    "bf16": {"autocast_dtype": torch.bfloat16, "custom_rules": True},
    "bf16_stock_rules": {"autocast_dtype": torch.bfloat16, "custom_rules": False},
    "fp32_bn_train": {"bn_mode": "train"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--check", type=int, default=2, help="whose Hessian batch (0-based check count)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="estimates to take"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, batches = _setup(args.run_dir, args.check, device)
    rows = {"run": str(args.run_dir), "check": args.check, "samples": sum(len(b[1]) for b in batches)}
    rows.update(_bn_extremes(model))
    params = curvature.resolve_block(model, cfg.hessian_block)
    model.eval()
    with torch.no_grad():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = sum(curvature.cross_entropy_loss(model, b).float() * len(b[1]) for b in batches)
            rows[f"loss_{name}"] = float(loss) / rows["samples"]
    for name in args.variants:
        kw = VARIANTS[name]
        kw = {
            "bn_mode": cfg.hessian_bn_mode,
            "seed": cfg.seed + args.check,
            "solver": cfg.hessian_solver,
            **kw,
        }
        r = curvature.top_eigenvalue(
            model, curvature.cross_entropy_loss, batches, params=params, max_iter=args.iters, tol=0.0, **kw
        )
        rows[f"eig_{name}"] = r.eigenvalue
        print(f"{name:18s} eigenvalue {r.eigenvalue:12.4f}  finite {r.finite}", flush=True)
    print(json.dumps(rows, indent=1))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
