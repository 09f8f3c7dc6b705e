"""The small CNN's first convolution (one input channel, 512 images of 28x28) and its weight gradient,
with NCHW strides against explicit channels-last strides (a one-channel tensor is contiguous in both
formats; the CPU kernels follow its strides). Median of 20 calls after one.

    .venv/bin/python benchmarks/probe_one_channel_conv.py > benchmarks/results/probe_one_channel_conv_cpu.txt
"""

import time

import torch
import torch.nn.functional as F


def t(fn, n=20):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


x = torch.rand(512, 1, 28, 28)
w = torch.randn(16, 1, 3, 3)
wcl = torch.empty_strided((16, 1, 3, 3), (9, 1, 3, 1)).copy_(w)
xcl = torch.empty_strided((512, 1, 28, 28), (784, 1, 28, 1)).copy_(x)
for xn, xx in (("x nchw", x), ("x cl-strided", xcl)):
    for wn, ww in (("w nchw", w), ("w cl-strided", wcl)):
        out = F.conv2d(xx, ww, None, 1, 1)
        print(xn, wn, f"{t(lambda xx=xx, ww=ww: F.conv2d(xx, ww, None, 1, 1)):.2f} ms", out.stride())
g = torch.randn(512, 16, 28, 28)
gcl = g.contiguous(memory_format=torch.channels_last)
for gn, gg in (("g nchw", g), ("g cl", gcl)):
    for xn, xx in (("x nchw", x), ("x cl", xcl)):
        print(
            "weight grad",
            gn,
            xn,
            f"{t(lambda gg=gg, xx=xx: torch.ops.aten.convolution_backward(gg, xx, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])):.2f} ms",
        )
