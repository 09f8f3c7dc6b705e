"""Run under torchrun (2 ranks, gloo): each rank holds half of a 40-sample Hessian batch."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from test_curvature import data, tiny_mlp  # noqa: E402

from scaling_abs.curvature import cross_entropy_loss, top_eigenvalue  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
model, (x, y) = tiny_mlp(), data(40)
mine = (x[rank * 20 : (rank + 1) * 20], y[rank * 20 : (rank + 1) * 20])
res = top_eigenvalue(model, cross_entropy_loss, [mine], max_iter=30, tol=0)
lanczos = top_eigenvalue(model, cross_entropy_loss, [mine], max_iter=30, tol=1e-10, solver="lanczos")
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"eigenvalue": res.eigenvalue, "samples": res.samples, "lanczos": lanczos.eigenvalue}, f)
dist.barrier()
dist.destroy_process_group()
