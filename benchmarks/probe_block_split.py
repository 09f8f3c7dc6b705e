"""Would finer checkpoint pieces cut a checkpointed product's memory? The peak of one piece's double
backward (what ``checkpoint=True`` holds at once, besides the cuts) for ResNet-18's layer1[0] block
whole, and for its two halves split inside the block (conv1-bn1-relu; conv2-bn2 + skip, relu).
CPU, one process per case, glibc mapping every block >= 64 KiB on its own so the peak RSS follows
the live tensors:

    for w in full a b; do MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python benchmarks/probe_block_split.py $w 128; done

Peak RSS above the inputs (x, its tangent, g and its derivative are allocated before).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaling_abs import _second_order  # noqa: E402


def main() -> None:
    which, batch = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    blk = torchvision.models.resnet18(num_classes=10).layer1[0].eval()

    def half_a(inp):
        return blk.relu(blk.bn1(blk.conv1(inp[0])))

    def half_b(inp):
        h, x = inp
        return blk.relu(blk.bn2(blk.conv2(h)) + x)

    x = torch.randn(batch, 64, 32, 32)
    if which == "b":
        with torch.no_grad():
            inp = (half_a((x,)), x)
        params = [*blk.conv2.parameters(), *blk.bn2.parameters()]
    else:
        inp = (x,)
        params = [*blk.conv1.parameters(), *blk.bn1.parameters()] if which == "a" else list(blk.parameters())
    f = {"full": lambda i: blk(i[0]), "a": half_a, "b": half_b}[which]
    dots = [torch.randn_like(t) for t in inp]
    v = [torch.randn_like(p) for p in params]
    with torch.no_grad():
        y0 = f(inp)
    g, gdot = torch.randn_like(y0), torch.randn_like(y0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with _second_order.second_order_rules(blk):
        xin = [t.detach().requires_grad_() for t in inp]
        y = f(xin)
        grads = torch.autograd.grad(y, xin + params, g, create_graph=True)
        terms = sum((a * b).sum() for a, b in zip(grads, dots + v)) + (y * gdot).sum()
        torch.autograd.grad(terms, xin + params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(f"{which:4s} batch {batch}: peak +{peak:.0f} MiB; one activation {x.numel() * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
