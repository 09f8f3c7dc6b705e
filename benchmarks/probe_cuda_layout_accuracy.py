"""How far ResNet-18's fp32 HVP (``hvp``'s default eval-mode BatchNorm, 256 images, TF32 off) is
from fp64 with our second-order rules' convolutions in NCHW and in channels-last (BatchNorm folding
as ``FOLD_DEVICES`` says), checkpointed or not, with cuDNN free to pick its algorithms and
deterministic: the probe behind a failed ``tests/test_gpu.py`` check (checkpointed against plain,
1.4e-4 apart with folding and channels-last on CUDA), and the smallest |input| of any ReLU in a
train-mode and an eval-mode forward (a kink two fp32 runs may read on opposite sides).
(``gpu_2026-11-27/call2/probe_cuda_layout_accuracy.json`` was written when the margin was read in
train mode only, as ``relu_margin``.)

    python3 benchmarks/probe_cuda_layout_accuracy.py --out probe_cuda_layout_accuracy.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaling_abs import _second_order  # noqa: E402
from scaling_abs.curvature import cross_entropy_loss, hvp  # noqa: E402
from scaling_abs.models import build_model  # noqa: E402
from tests.test_gpu import rel  # noqa: E402  (the GPU tests' relative distance and ReLU margin)
from tests.test_segmented import relu_margin  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)  # as tests/test_gpu.py builds its case (seed 0 there)
        model = build_model("c1", num_classes=10, in_channels=3, image_size=32).to(device)
        x = torch.rand(args.batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        v = [torch.randn_like(p) for p in model.parameters()]
        ref = hvp(copy.deepcopy(model).double(), cross_entropy_loss, (x.double(), y), [t.double() for t in v])
        row = {"seed": seed, "relu_margin": relu_margin(model, x, "train")}
        row["relu_margin_eval"] = relu_margin(model, x, "eval")
        for layout in ("nchw", "channels_last"):
            _second_order.LAYOUT_DEVICES = ("cpu", "cuda") if layout == "channels_last" else ("cpu",)
            for deterministic in (False, True):
                torch.backends.cudnn.deterministic = deterministic
                out = {c: hvp(model, cross_entropy_loss, (x, y), v, checkpoint=c) for c in (False, True)}
                key = f"{layout}{'_deterministic' if deterministic else ''}"
                row[key] = {
                    "plain_vs_fp64": rel(out[False], ref),
                    "checkpointed_vs_fp64": rel(out[True], ref),
                    "checkpointed_vs_plain": rel(out[True], out[False]),
                }
        torch.backends.cudnn.deterministic = False
        _second_order.LAYOUT_DEVICES = ("cpu",)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
