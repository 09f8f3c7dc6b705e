"""Our second-order rules for convolutions and eval-mode BatchNorm (scaling_abs/_second_order.py):
the same Hessian as PyTorch's rules, exactly (fp64 dense Hessians) and at fp32 rounding (ResNet-18),
used where they should be and not elsewhere."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scaling_abs import _second_order, curvature
from scaling_abs._second_order import second_order_rules, wanted
from scaling_abs.curvature import cross_entropy_loss, hvp, top_eigenvalue
from tests.test_curvature import dense_hessian, flat


class ConvZoo(nn.Module):
    """Every convolution shape the rules handle: 1-d, 2-d (stride, padding, dilation, groups, bias),
    3-d, and eval-mode BatchNorm with and without affine parameters. A learnable input scale first,
    so every convolution's input needs a gradient (the input-gradient rule runs everywhere)."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Parameter(torch.linspace(0.5, 1.5, 2).view(1, 2, 1, 1))
        self.c1 = nn.Conv1d(2, 4, 3, padding=1, bias=True)
        self.c2 = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2, bias=False)
        self.c2d = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.bn_plain = nn.BatchNorm2d(4, affine=False)
        self.c3 = nn.Conv3d(1, 2, (1, 2, 2), stride=(1, 2, 1), bias=True)
        self.head = nn.Linear(4 * 5 + 4 + 2, 3)

    def forward(self, x):
        x = x * self.pre
        a = torch.relu(self.c1(x.flatten(2)[..., :5]))  # (B, 4, 5)
        b = self.c2d(torch.relu(self.bn(self.c2(x))))  # (B, 4, 3, 3)
        b = self.bn_plain(torch.tanh(b)).mean((2, 3))
        c = torch.tanh(self.c3(x[:, :1].unsqueeze(1))).mean((2, 3, 4))  # (B, 2)
        return self.head(torch.cat([a.flatten(1), b, c], 1))


def zoo(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvZoo().double()
    model.train()
    with torch.no_grad():  # running statistics that are not the identity
        for _ in range(3):
            model(torch.randn(8, 2, 5, 5, dtype=torch.float64))
    return model.eval()


def batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@contextlib.contextmanager
def spy(monkeypatch):
    """Counts of what the rules did: convolutions built, input and weight rules differentiated,
    BatchNorms replaced."""
    counts = {"conv": 0, "input": 0, "weight": 0, "bn": 0}

    def counting(name, cls_or_fn, attr=None):
        if attr is None:  # a module function
            original = cls_or_fn

            def wrapped(*a, **k):
                counts[name] += 1
                return original(*a, **k)

            return wrapped
        original = getattr(cls_or_fn, attr)

        def wrapped_static(*a, **k):
            counts[name] += 1
            return original(*a, **k)

        return staticmethod(wrapped_static)

    monkeypatch.setattr(_second_order, "_conv", counting("conv", _second_order._conv))
    monkeypatch.setattr(_second_order, "_eval_batch_norm", counting("bn", _second_order._eval_batch_norm))
    monkeypatch.setattr(
        _second_order._InputGrad, "backward", counting("input", _second_order._InputGrad, "backward")
    )
    monkeypatch.setattr(
        _second_order._WeightGrad, "backward", counting("weight", _second_order._WeightGrad, "backward")
    )
    yield counts


def test_custom_rules_give_the_dense_hessian(monkeypatch):
    model, data = zoo(), batch()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    expected = dense_hessian(model, data) @ flat(v)
    for reuse in (True, False):
        op = curvature.HessianOperator(
            model, cross_entropy_loss, [data], params, reuse_graph=reuse, custom_rules=True
        )
        with spy(monkeypatch) as counts, curvature.preserved_state(model):
            got = flat(op(v))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        # 4 convolutions built and both of their rules differentiated; 2 BatchNorms replaced
        assert counts == {"conv": 4, "input": 4, "weight": 4, "bn": 2}, (reuse, counts)
    stock = flat(hvp(model, cross_entropy_loss, data, v, method="double_backward", custom_rules=False))
    torch.testing.assert_close(stock, expected, rtol=1e-10, atol=1e-12)


def test_rules_are_used_where_they_apply_and_nowhere_else():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(3).eval()
    reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    same = nn.Conv2d(3, 4, 3, padding="same")
    model = nn.ModuleList([conv, bn, reflect, same])

    def name(t):
        return type(t.grad_fn).__name__

    with second_order_rules(model):
        assert name(conv(x)) == "_ConvBackward"
        assert name(bn(x)) == "AddBackward0"  # x * scale + shift
        # PyTorch's own rules: other padding modes, string padding, unbatched input, batch statistics
        assert name(reflect(x)) == "ConvolutionBackward0"
        assert name(same(x)) == "ConvolutionBackward0"
        assert type(conv(x[0]).grad_fn.next_functions[0][0]).__name__ == "ConvolutionBackward0"
        assert name(bn.train()(x)) == "NativeBatchNormBackward0"
        bn.eval()
        with second_order_rules(model):  # nested: the inner exit leaves the outer's rules in place
            assert name(conv(x)) == "_ConvBackward"
        assert name(conv(x)) == "_ConvBackward"
    assert name(conv(x)) == "ConvolutionBackward0"  # nothing left behind
    assert name(bn(x)) == "NativeBatchNormBackward0"
    assert all("forward" not in m.__dict__ for m in model.modules())
    with second_order_rules(model, enabled=False):
        assert name(conv(x)) == "ConvolutionBackward0"


class FoldCases(nn.Module):
    """Eval-mode BatchNorm after convolutions, folded or not: a 2-d convolution with a bias, a
    1-d one, one whose output also feeds a skip connection (folded, and the skip still sees the
    convolution), and one whose output is changed in place before its BatchNorm (not folded)."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Parameter(torch.linspace(0.5, 1.5, 2).view(1, 2, 1, 1))
        self.c_bias, self.bn_bias = nn.Conv2d(2, 3, 3, padding=1, bias=True), nn.BatchNorm2d(3)
        self.c_1d, self.bn_1d = nn.Conv1d(2, 3, 3, padding=1, bias=False), nn.BatchNorm1d(3)
        self.c_skip, self.bn_skip = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c_inplace, self.bn_inplace = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.head = nn.Linear(3 + 3, 3)

    def forward(self, x):
        x = x * self.pre
        a = torch.tanh(self.bn_bias(self.c_bias(x)))
        c = self.c_skip(a)
        b = torch.tanh(self.bn_skip(c) + c)  # the convolution's output used twice
        d = self.c_inplace(b)
        d.mul_(1.5)  # in place: the BatchNorm must see it
        b = torch.tanh(self.bn_inplace(d))
        e = torch.tanh(self.bn_1d(self.c_1d(x.flatten(2))))
        return self.head(torch.cat([b.mean((2, 3)), e.mean(2)], 1))


def test_batch_norm_folds_into_the_convolution_before_it(monkeypatch):
    """``conv(x, W) * s + t`` computed as ``conv(x, W * s) + t``: the same Hessian (fp64 dense), where
    the BatchNorm reads a convolution's untouched output, and only there."""
    torch.manual_seed(0)
    model = FoldCases().double()
    model.train()
    with torch.no_grad():  # running statistics that are not the identity
        for _ in range(3):
            model(torch.randn(8, 2, 5, 5, dtype=torch.float64))
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    data = batch()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    expected = dense_hessian(model, data) @ flat(v)
    folded = []
    original = _second_order._folded

    def counted(conv_out, scale, shift):
        out = original(conv_out, scale, shift)
        folded.append(out is not None)
        return out

    monkeypatch.setattr(_second_order, "_folded", counted)
    for reuse in (True, False):
        op = curvature.HessianOperator(model, cross_entropy_loss, [data], params, reuse_graph=reuse)
        torch.testing.assert_close(flat(op(v)), expected, rtol=1e-10, atol=1e-12)
        # bias, skip and 1-d folded; the one changed in place not
        assert folded == [True, True, False, True], folded
        folded.clear()
    ours, stock = (
        curvature.grad_and_hvp(model, cross_entropy_loss, data, v, params=params, custom_rules=rules)
        for rules in (True, False)
    )
    torch.testing.assert_close(flat(ours[0]), flat(stock[0]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(ours[1]), flat(stock[1]), rtol=1e-10, atol=1e-12)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    cl = torch.channels_last
    for rules, layout in ((True, cl), (False, cl), (False, torch.contiguous_format)):
        # the input changed in place after the convolution: not folded, so autograd refuses it as
        # PyTorch's rules do (not a silent fold with the changed input)
        h = (x * model.pre).contiguous(memory_format=layout).clone()
        with second_order_rules(model, rules):
            out = model.c_bias(h)
            h.mul_(2.0)
            with pytest.raises(RuntimeError, match="inplace"):
                torch.autograd.grad(model.bn_bias(out).sum(), model.pre)
    # an NCHW input: our convolution ran on a channels-last copy, which the change does not touch,
    # so the gradient is the unchanged input's (folded or not, the graph holds the copy)
    (expected_grad,) = torch.autograd.grad(model.bn_bias(model.c_bias(x * model.pre)).sum(), model.pre)
    h = (x * model.pre).clone()
    with second_order_rules(model):
        out = model.c_bias(h)
        h.mul_(2.0)
        (grad,) = torch.autograd.grad(model.bn_bias(out).sum(), model.pre)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    with second_order_rules(model):
        assert type(model.bn_bias(model.c_bias(x)).grad_fn).__name__ == "_ConvBackward"
        assert type(model.bn_skip(x[:, :1].expand(2, 3, 5, 5)).grad_fn).__name__ == "AddBackward0"


def test_cpu_convolutions_run_channels_last_and_products_come_back_contiguous():
    """On the CPU our rules run 2-d convolutions in the channels-last memory format (measured
    faster); ReLU, eval-mode BatchNorm and our max pooling keep it, and what the curvature functions
    return is in the default layout again (safetensors, all-reduces and ``view`` need that)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    ).eval()  # fmt: skip
    x = torch.randn(5, 1, 6, 6)  # one channel: contiguous in both formats, with NCHW strides
    cl = torch.channels_last
    assert x.is_contiguous(memory_format=cl) and x.stride() == (36, 36, 6, 1)
    nhwc = _second_order._nhwc(x)  # the kernels read those strides as NCHW: made explicit
    assert nhwc.stride() == (36, 1, 6, 1) and torch.equal(nhwc, x)
    assert _second_order._nhwc(nhwc) is nhwc
    with second_order_rules(model):
        h = x
        for layer in model[:5]:
            h = layer(h)
            assert h.is_contiguous(memory_format=cl) and not h.is_contiguous(), layer
    conv1d = nn.Conv1d(2, 3, 3)
    with second_order_rules(conv1d):
        assert conv1d(torch.randn(4, 2, 7)).is_contiguous()  # 1-d convolutions as they are
    data = (x, torch.randint(0, 3, (5,)))
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    g, hv = curvature.grad_and_hvp(model, cross_entropy_loss, data, v, params=params, custom_rules=True)
    op = curvature.HessianOperator(model, cross_entropy_loss, [data], params, custom_rules=True)
    assert all(t.is_contiguous() for t in [*g, *hv, *op(v)])
    ref_g, ref_hv = curvature.grad_and_hvp(
        model, cross_entropy_loss, data, v, params=params, custom_rules=False
    )
    torch.testing.assert_close(flat(hv), flat(ref_hv), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(g), flat(ref_g), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_max_pool_rule_keeps_the_memory_format_and_pytorchs_derivatives(layout):
    """Our max pooling in either memory format (after a convolution under our rules on the CPU it
    is channels-last), also with a gradient arriving in the other one: PyTorch's first and second
    derivatives, and the input's format kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, 6, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_()
    conf = ((3, 3), (2, 2), (1, 1), (1, 1), True)  # overlapping windows, padding, ceil_mode

    def ours(t):
        return _second_order._MaxPool.apply(t, conf)

    def stock(t):
        return F.max_pool2d(t, 3, 2, 1, 1, True)

    torch.testing.assert_close(ours(x), stock(x), rtol=0, atol=0)
    assert ours(x).is_contiguous(memory_format=layout)
    other = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
    for fmt in (layout, other):
        gy = torch.randn(ours(x).shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
        gy.requires_grad_()
        (gx,) = torch.autograd.grad(ours(x), x, gy, create_graph=True)
        (gx_ref,) = torch.autograd.grad(stock(x), x, gy, create_graph=True)
        torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
        assert gx.is_contiguous(memory_format=layout)
        w = torch.randn(x.shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
        (ggy,) = torch.autograd.grad(gx, gy, w)  # the input gradient differentiated in ``gy``
        (ggy_ref,) = torch.autograd.grad(gx_ref, gy, w)
        torch.testing.assert_close(ggy, ggy_ref, rtol=0, atol=0)
    assert torch.autograd.gradgradcheck(ours, (x,))


class PoolNet(nn.Module):
    """ReLU and max-pooling modules (in place, overlapping windows with padding, dilation and
    ceil_mode, and the plain 2x2 one) between convolutions and eval-mode BatchNorm."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True),
            nn.MaxPool2d((2, 1), stride=1, dilation=(1, 1)),
        )  # fmt: skip
        self.head = nn.Linear(4 * 1 * 2, 3)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def test_relu_and_max_pool_rules_give_the_dense_hessian(monkeypatch):
    """ReLU and max pooling are piecewise linear: their backward's derivative in the forward input
    is zero, which PyTorch's rules build as full-size zeros tensors and carry back through the
    forward graph; ours leave it out. The same Hessian, and the same gradient."""
    torch.manual_seed(0)
    model = PoolNet().double()
    model.train()(torch.randn(8, 2, 6, 6, dtype=torch.float64))
    model.eval()
    g = torch.Generator().manual_seed(3)
    data = torch.randn(6, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    params = list(model.parameters())
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    expected = dense_hessian(model, data) @ flat(v)
    used = {"relu": 0, "pool": 0}
    for name, cls in (("relu", _second_order._Relu), ("pool", _second_order._MaxPool)):
        original = cls.apply

        def counted(*a, _name=name, _original=original):
            used[_name] += 1
            return _original(*a)

        monkeypatch.setattr(cls, "apply", counted)
    for reuse in (True, False):
        op = curvature.HessianOperator(model, cross_entropy_loss, [data], params, reuse_graph=reuse)
        torch.testing.assert_close(flat(op(v)), expected, rtol=1e-10, atol=1e-12)
    assert used == {"relu": 4, "pool": 6}  # 2 ReLUs and 3 poolings, in each of the two graphs
    ours, stock = (
        curvature.grad_and_hvp(model, cross_entropy_loss, data, v, params=params, custom_rules=rules)
        for rules in (True, False)
    )
    torch.testing.assert_close(flat(ours[0]), flat(stock[0]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(ours[1]), flat(stock[1]), rtol=1e-10, atol=1e-12)


def test_relu_and_max_pool_rules_where_they_apply_and_nowhere_else():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    relu, pool = nn.ReLU(inplace=True), nn.MaxPool2d(2)
    with_indices, leaky = nn.MaxPool2d(2, return_indices=True), nn.LeakyReLU()
    model = nn.ModuleList([relu, pool, with_indices, leaky])

    def name(t):
        return type(t.grad_fn).__name__

    with second_order_rules(model):
        y = x * 1.0
        assert name(relu(y)) == "_ReluBackward" and name(y) == "MulBackward0"  # not in place
        assert name(pool(x)) == "_MaxPoolBackward"
        assert name(with_indices(x)[0]) == "MaxPool2DWithIndicesBackward0"
        assert name(pool(x[0])) == "MaxPool2DWithIndicesBackward0"  # unbatched
        assert name(leaky(x)) == "LeakyReluBackward0"  # only nn.ReLU has our rule
    assert name(relu(x * 1.0)) == "ReluBackward0"
    assert name(pool(x)) == "MaxPool2DWithIndicesBackward0"
    empty = torch.randn(0, 3, 6, 6, requires_grad=True)  # an empty micro-batch: no reshape of -1
    with second_order_rules(model):
        (g,) = torch.autograd.grad(pool(empty).sum(), empty, create_graph=True)
    assert g.shape == empty.shape


def test_auto_is_on_for_cpu_and_cuda_without_autocast_only_and_bad_values_raise():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert wanted("auto", cpu, None) is True
    assert wanted("auto", cuda, None) is True  # measured faster on an H100 (benchmarks/README.md)
    assert wanted("auto", cpu, torch.bfloat16) is False
    assert wanted("auto", cuda, torch.bfloat16) is True  # 0.37x PyTorch's rules' time at 1,024 images
    assert wanted("auto", cuda, torch.float16) is False  # not measured
    assert wanted("auto", mps, None) is False  # not measured there: PyTorch's rules
    assert wanted(True, cuda, torch.bfloat16) is True
    model, data = zoo(), batch()
    v = [torch.ones_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="custom_rules"):
        hvp(model, cross_entropy_loss, data, v, custom_rules="yes")
    with pytest.raises(ValueError, match="custom_rules"):
        top_eigenvalue(model, cross_entropy_loss, [data], custom_rules=1)


def test_resnet18_fp32_products_match_pytorchs_rules():
    # The tolerance for fp32 paths: relative 1e-5 against the reference HVP.
    from scaling_abs.models import build_model

    torch.manual_seed(0)
    model = build_model("c1", num_classes=10, in_channels=3, image_size=16).eval()
    g = torch.Generator().manual_seed(1)
    data = (torch.rand(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))
    v = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    ours = flat(hvp(model, cross_entropy_loss, data, v, custom_rules=True))
    stock = flat(hvp(model, cross_entropy_loss, data, v, custom_rules=False))
    assert ((ours - stock).norm() / stock.norm()).item() < 1e-5


class Checkpointed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


def test_custom_rules_under_activation_checkpointing_and_autocast(monkeypatch):
    model, data = zoo(), batch()
    v = [torch.ones_like(p) for p in model.parameters()]
    plain = flat(hvp(model, cross_entropy_loss, data, v, method="double_backward", custom_rules=False))
    ckpt = flat(hvp(Checkpointed(model), cross_entropy_loss, data, v, custom_rules=True))
    torch.testing.assert_close(ckpt, plain, rtol=1e-10, atol=1e-12)
    # forced on under bf16 autocast: the casts happen before the saved tensors, so dtypes match
    model32 = zoo().float()
    x32, y = data[0].float(), data[1]
    v32 = [torch.ones_like(p) for p in model32.parameters()]
    full = flat(hvp(model32, cross_entropy_loss, (x32, y), v32, custom_rules=False))
    kw = {"autocast_dtype": torch.bfloat16}
    with spy(monkeypatch) as counts:
        ours = flat(hvp(model32, cross_entropy_loss, (x32, y), v32, custom_rules=True, **kw))
    assert counts["conv"] == 4 and counts["input"] == 4
    stock = flat(hvp(model32, cross_entropy_loss, (x32, y), v32, custom_rules=False, **kw))
    assert ours.dtype == torch.float32
    assert (ours - full).norm() / full.norm() < 2e-2
    assert (stock - full).norm() / full.norm() < 2e-2


class StandardisedConv(nn.Conv2d):
    """Weight standardisation the timm way: its own forward around F.conv2d."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledConv(nn.Conv2d):
    """A transformed weight through nn.Conv2d's own _conv_forward (as fake quantisation does)."""

    def forward(self, x):
        return self._conv_forward(x, self.weight * 0.5, self.bias)


class NormedBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_subclasses_keep_their_own_forward(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        StandardisedConv(2, 3, 3, padding=1),
        nn.ReLU(),
        ScaledConv(3, 3, 3, padding=1),
        NormedBatchNorm(3),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 3),
    ).double()
    model[3].running_mean.uniform_(-1, 1)
    model.eval()
    x, y = batch()
    v = [torch.randn_like(p) for p in model.parameters()]
    with spy(monkeypatch) as counts:
        ours = flat(hvp(model, cross_entropy_loss, (x, y), v, custom_rules=True))
    stock = flat(hvp(model, cross_entropy_loss, (x, y), v, custom_rules=False))
    torch.testing.assert_close(ours, stock, rtol=1e-10, atol=1e-12)
    # only ScaledConv (through _conv_forward) runs under the rules: StandardisedConv's forward never
    # calls _conv_forward, and NormedBatchNorm overrides the forward the rule would replace
    assert counts["conv"] == 1 and counts["bn"] == 0
    with second_order_rules(model):
        assert "forward" not in model[3].__dict__ and "_conv_forward" in model[2].__dict__


def test_fp64_stays_fp64_under_forced_rules_and_autocast():
    model, data = zoo(), batch()
    v = [torch.ones_like(p) for p in model.parameters()]
    stock = flat(hvp(model, cross_entropy_loss, data, v, custom_rules=False))
    kw = {"autocast_dtype": torch.bfloat16, "custom_rules": True}
    torch.testing.assert_close(flat(hvp(model, cross_entropy_loss, data, v, **kw)), stock)


def test_copies_and_compiled_models():
    import copy

    model = zoo()
    with second_order_rules(model):
        clone = copy.deepcopy(model)  # a copy made meanwhile is bound to itself, not to model
    with torch.no_grad():
        clone.c2.weight.zero_()
    x, _ = batch()
    assert not torch.equal(clone(x), model(x))
    # ... and its leftover attributes are inert: PyTorch's rules, within a check of model or not
    assert "_conv_forward" in clone.c2.__dict__
    assert type(clone.c2(x).grad_fn).__name__ == "ConvolutionBackward0"
    with second_order_rules(model):
        assert type(clone.c2(x).grad_fn).__name__ == "ConvolutionBackward0"
        assert type(model.c2(x).grad_fn).__name__ == "_ConvBackward"
    # torch.compile (eager backend: the only one with double backward) keeps PyTorch's rules
    want = None
    for compiled in (torch.compile(zoo(), backend="eager"), zoo()):
        if want is None:
            v = [torch.ones_like(p) for p in compiled.parameters()]
            want = flat(hvp(zoo(), cross_entropy_loss, batch(), v, custom_rules=False))
        else:
            compiled.compile(backend="eager")  # in place: no wrapper, the module itself is compiled
        got = flat(hvp(compiled, cross_entropy_loss, batch(), v, custom_rules=True))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_torch_func_transforms_and_half_precision_keep_pytorchs_rules():
    from torch.func import functional_call, vmap

    model = zoo()
    x, _ = batch()
    params = {n: p.detach().unsqueeze(0).repeat(2, *[1] * p.dim()) for n, p in model.named_parameters()}
    plain = vmap(lambda p: functional_call(model, p, (x,)))(params)
    with second_order_rules(model):  # a vmapped ensemble inside a check: no functorch rules needed
        inside = vmap(lambda p: functional_call(model, p, (x,)))(params)
    torch.testing.assert_close(inside, plain)
    # fp16 BatchNorm: s and t in fp16 would overflow here (x * s); PyTorch's kernel computes in fp32
    bn = nn.BatchNorm1d(1).eval().half()
    bn.running_mean.fill_(300.0)
    bn.running_var.fill_(1e-6)
    x16 = torch.full((2, 1), 300.5, dtype=torch.float16)
    with second_order_rules(bn):
        out = bn(x16)
    assert torch.isfinite(out).all() and torch.equal(out, bn(x16))
