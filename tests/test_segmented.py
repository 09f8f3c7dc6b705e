"""Checkpointed HVPs (``checkpoint=True`` / a ``curvature.Chain``): exact against dense Hessians, equal
to the plain double backward on ResNet-18, and the planner's choices."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from scaling_abs import curvature
from scaling_abs._segmented import measure, plan
from scaling_abs.curvature import Chain, cross_entropy_loss, hvp, top_eigenvalue
from scaling_abs.models import Normalized, build_model
from tests.test_curvature import conv_bn_conv, data, dense_hessian, flat, hvp_of_ones, tiny_bn_cnn


def bn_cnn_with_stats(seed: int = 0) -> tuple[nn.Module, tuple]:
    model = tiny_bn_cnn(seed)
    x, y = data(16, shape=(1, 6, 6))
    model.train()
    model(x)  # non-trivial running statistics
    return model, (x, y)


class TanhNet(nn.Module):
    """``b(tanh(a(x)))``, whose ``hessian_units()`` is right, or leaves the tanh out."""

    def __init__(self, units_with_tanh: bool = True):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)
        self.units_with_tanh = units_with_tanh

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))

    def hessian_units(self):
        return [self.a, torch.tanh, self.b] if self.units_with_tanh else [self.a, self.b]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cuts", [None, [0], [0, 1, 2, 3, 4], [0, 2, 4]])
def test_checkpointed_hvp_matches_the_dense_hessian(cuts):
    model, batch = bn_cnn_with_stats()
    h = dense_hessian(model, batch)
    v = [torch.randn_like(p) for p in model.parameters()]
    ch = Chain(list(model), cuts=cuts)
    out = flat(hvp(model, cross_entropy_loss, batch, v, checkpoint=ch))
    assert rel(out, h @ flat(v)) < 1e-12


def test_checkpointed_block_hvp_is_the_dense_sub_block():
    model, batch = bn_cnn_with_stats()
    block = [*model[1].parameters(), *model[4].parameters()]  # BatchNorm, Linear: none in the first piece
    h = dense_hessian(model, batch, block)
    v = [torch.randn_like(p) for p in block]
    ch = Chain(list(model), cuts=[0, 1, 2, 3, 4])
    out = flat(hvp(model, cross_entropy_loss, batch, v, params=block, checkpoint=ch))
    assert rel(out, h @ flat(v)) < 1e-12


def relu_margin(model: nn.Module, x: torch.Tensor, bn_mode: str) -> float:
    """The smallest |input| of any ReLU in a forward: how far the batch is from a kink."""
    low: list[float] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: low.append(a[0].abs().min().item()))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    with curvature.preserved_state(model, bn_mode), torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return min(low)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_resnet18_checkpointed_equals_double_backward(bn_mode):
    torch.manual_seed(2)
    net = build_model("c1", num_classes=10, in_channels=3, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    net.train()
    net(x)
    # A ReLU input within fp32 rounding of 0 is a kink: two exact methods may read it on either
    # side and their HVPs then differ by far more than 1e-5 (seed 0 had one at 1e-7: 5e-3 apart).
    # This batch keeps every ReLU input >= 2.8e-6 from 0, beyond the products' rounding.
    assert relu_margin(net, x, bn_mode) > 2e-6
    v = [torch.randn_like(p) for p in net.parameters()]
    kw = {"bn_mode": bn_mode}
    ref = flat(hvp(net, cross_entropy_loss, (x, y), v, method="double_backward", custom_rules=False, **kw))
    for rules in (False, True):
        out = flat(hvp(net, cross_entropy_loss, (x, y), v, checkpoint=True, custom_rules=rules, **kw))
        assert rel(out, ref) < 1e-5, rules


def test_the_planner_cuts_resnet18_at_its_blocks():
    torch.manual_seed(0)
    net = build_model("c1", num_classes=10, in_channels=3, image_size=16)
    ch = curvature.chain(net)
    assert isinstance(ch.units[0], nn.Module) and isinstance(ch.units[-1], nn.Linear)
    assert len(ch.units) == 1 + 4 + 8 + 3  # normalisation, stem, 8 blocks, pool + flatten + fc
    v = [torch.zeros_like(p) for p in net.parameters()]
    hvp(
        net,
        cross_entropy_loss,
        (torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)),
        v,
        checkpoint=ch,
    )
    (cuts,) = ch._plans.values()
    assert 3 <= len(cuts) <= 10
    blocks = {i for i, u in enumerate(ch.units) if isinstance(u, torchvision.models.resnet.BasicBlock)}
    assert set(cuts[1:]) <= blocks  # the pieces start at residual blocks


def test_plan_trades_cuts_against_the_largest_piece():
    # cuts cost nothing: every unit its own piece; cuts cost a lot: one piece
    assert plan([0, 0, 0, 0], [5, 5, 5, 5]) == [0, 1, 2, 3]
    assert plan([100, 100, 100], [1, 1, 1]) == [0]
    # a small output in the middle is where one cut pays
    assert plan([50, 1, 50, 50], [30, 30, 30, 30], factor=3) == [0, 2]


def test_measure_counts_what_a_forward_saves_once():
    lin = nn.Linear(10, 10)
    outputs, saved = measure(
        [lin, nn.ReLU()], torch.rand(4, 10), lambda: torch.autocast("cpu", enabled=False), set()
    )
    assert outputs == [4 * 10 * 4, 4 * 10 * 4]
    assert saved[0] >= 4 * 10 * 4  # the input (the weight is a parameter, counted here as not excluded)
    assert saved[1] == 4 * 10 * 4  # ReLU keeps its output


def test_checkpointed_top_eigenvalue_and_trace_equal_the_plain_ones():
    torch.manual_seed(0)
    net = build_model("cnn", num_classes=10, in_channels=1, image_size=12).double()
    x, y = torch.rand(24, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (24,))
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    plain = top_eigenvalue(net, cross_entropy_loss, batches, max_iter=6, tol=0)
    ckpt = top_eigenvalue(net, cross_entropy_loss, batches, max_iter=6, tol=0, checkpoint=True)
    assert ckpt.eigenvalue == pytest.approx(plain.eigenvalue, rel=1e-10)
    a = curvature.hutchinson_trace(net, cross_entropy_loss, batches, n_samples=3)
    b = curvature.hutchinson_trace(net, cross_entropy_loss, batches, n_samples=3, checkpoint=True)
    assert b.trace == pytest.approx(a.trace, rel=1e-10)


def test_dropout_masks_are_recomputed_alike():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 8),
        nn.Dropout(0.5),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Dropout(0.5),
        nn.Tanh(),
        nn.Linear(8, 3),
    )
    net = net.double()
    batch = data(16)
    v = [torch.randn_like(p) for p in net.parameters()]
    ch = Chain(list(net), cuts=[0, 3, 6])
    hvp(net, cross_entropy_loss, batch, v, checkpoint=ch, bn_mode="train")  # nothing to plan, but warm
    torch.manual_seed(7)
    ref = flat(hvp(net, cross_entropy_loss, batch, v, method="double_backward", bn_mode="train"))
    torch.manual_seed(7)
    out = flat(hvp(net, cross_entropy_loss, batch, v, checkpoint=ch, bn_mode="train"))
    assert rel(out, ref) < 1e-12  # the same masks in the tangent pass, the recomputation and the reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checkpointed_under_autocast_is_close_to_fp32(dtype):
    torch.manual_seed(0)
    net = build_model("cnn", num_classes=10, in_channels=1, image_size=12)
    x, y = torch.rand(32, 1, 12, 12), torch.randint(0, 10, (32,))
    v = [torch.randn_like(p) for p in net.parameters()]
    ref = flat(hvp(net, cross_entropy_loss, (x, y), v, method="double_backward"))
    out = flat(hvp(net, cross_entropy_loss, (x, y), v, checkpoint=True, autocast_dtype=dtype))
    assert torch.isfinite(out).all()
    assert 1e-3 < rel(out, ref) < 5e-2  # bf16 4.4e-2 off here, fp16 2.9e-2: not fp32's product


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tangents_under_autocast_need_no_fallback(dtype, monkeypatch):
    """batch_norm's forward-mode rule gave a low-precision input an fp32 tangent, the next
    convolution refused it, and every product fell back to two reverse passes per piece."""
    from scaling_abs import _segmented

    net, batch = conv_bn_conv()
    v = [torch.randn_like(p) for p in net.parameters()]
    # bf16 is 7-11 % off fp32 on this tiny net in either path: compare with the plain product
    ref = flat(hvp(net, cross_entropy_loss, batch, v, method="double_backward", autocast_dtype=dtype))

    def no_fallback(*a, **k):
        raise AssertionError("the tangents fell back to two reverse passes")

    monkeypatch.setattr(_segmented.SegmentedHVP, "_tangent_by_reverse", no_fallback)
    ch = Chain(list(net), cuts=[0, 6])  # a convolution after a BatchNorm inside the first piece
    out = flat(hvp(net, cross_entropy_loss, batch, v, checkpoint=ch, autocast_dtype=dtype))
    assert rel(out, ref) < 2e-2


def test_checkpoint_errors_are_clear():
    model, batch = bn_cnn_with_stats()
    v = [torch.ones_like(p) for p in model.parameters()]

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x)

    custom = Custom().double()
    with pytest.raises(ValueError, match="cannot split Custom"):
        hvp_of_ones(custom, checkpoint=True)
    with pytest.raises(ValueError, match="another loss_fn"):
        hvp(model, lambda m, b: cross_entropy_loss(m, b) * 2, batch, v, checkpoint=True)
    with pytest.raises(ValueError, match="in no unit"):
        hvp(model, cross_entropy_loss, batch, v, checkpoint=Chain(list(model)[1:]))
    with pytest.raises(ValueError, match="cuts"):
        Chain(list(model), cuts=[1, 2])
    with pytest.raises(ValueError, match="exclude each other"):
        top_eigenvalue(model, cross_entropy_loss, [batch], checkpoint=True, reuse_graph=True)
    with pytest.raises(ValueError, match="checkpoint must be"):
        hvp(model, cross_entropy_loss, batch, v, checkpoint="yes")


def test_units_of_knows_sequential_resnet_normalized_and_hessian_units():
    seq = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    assert len(curvature.units_of(seq)) == 3
    assert len(curvature.units_of(Normalized(seq, [0.5], [0.5]))) == 4
    resnet = torchvision.models.resnet18(num_classes=3)
    assert len(curvature.units_of(resnet)) == 4 + 8 + 3

    own = TanhNet().double()
    batch = data()
    v = [torch.randn_like(p) for p in own.parameters()]
    h = dense_hessian(own, batch)
    out = flat(hvp(own, cross_entropy_loss, batch, v, checkpoint=Chain(own.hessian_units(), cuts=[0, 1, 2])))
    assert rel(out, h @ flat(v)) < 1e-12
    assert (
        len(curvature.units_of(torchvision.models.alexnet(num_classes=3))) == 13 + 2 + 7
    )  # features, pool and flatten, classifier


@pytest.mark.parametrize("name", ["vit_tiny", "s1", "c2", "c3", "i2"])
def test_every_zoo_model_has_a_chain_that_gives_the_plain_hvp(name):
    size = 64 if name == "i2" else 16
    torch.manual_seed(0)
    net = build_model(name, num_classes=5, in_channels=3, image_size=size).double()
    x, y = torch.rand(4, 3, size, size, dtype=torch.float64), torch.randint(0, 5, (4,))
    v = [torch.randn_like(p) for p in net.parameters()]
    ref = flat(hvp(net, cross_entropy_loss, (x, y), v, method="double_backward", custom_rules=False))
    out = flat(hvp(net, cross_entropy_loss, (x, y), v, checkpoint=True))
    assert rel(out, ref) < 1e-10


def test_a_chain_that_is_not_the_forward_is_refused():
    wrong = TanhNet(units_with_tanh=False).double()
    with pytest.raises(ValueError, match="does not compute its forward"):
        hvp_of_ones(wrong, checkpoint=True)


def test_tangents_by_two_reverse_passes_where_forward_mode_fails(monkeypatch):
    import torch.autograd.forward_ad as fwad

    model, batch = bn_cnn_with_stats()
    h = dense_hessian(model, batch)
    v = [torch.randn_like(p) for p in model.parameters()]

    def refuse(*a, **k):
        raise NotImplementedError("no forward-mode rule (simulated)")

    monkeypatch.setattr(fwad, "make_dual", refuse)
    with pytest.warns(RuntimeWarning, match="two reverse passes"):
        out = flat(
            hvp(model, cross_entropy_loss, batch, v, checkpoint=Chain(list(model), cuts=[0, 1, 2, 3, 4]))
        )
    assert rel(out, h @ flat(v)) < 1e-12


def _mlp_ref(net, batch, v, **kw):
    return flat(hvp(net, cross_entropy_loss, batch, v, method="double_backward", **kw))


def test_a_weight_used_twice_in_one_piece_counts_once():
    torch.manual_seed(0)
    inner = nn.Linear(6, 6)
    net = nn.Sequential(nn.Linear(5, 6), inner, nn.Tanh(), inner, nn.Tanh(), nn.Linear(6, 3)).double()
    batch = data()
    v = [torch.randn_like(p) for p in net.parameters()]
    for cuts in ([0], [0, 1, 5], None):
        out = flat(hvp(net, cross_entropy_loss, batch, v, checkpoint=Chain(list(net), cuts=cuts)))
        assert rel(out, _mlp_ref(net, batch, v)) < 1e-12, cuts


@pytest.mark.parametrize("act", [nn.SiLU, nn.ELU])
def test_an_in_place_unit_at_a_cut_changes_neither_the_cut_nor_its_tangent(act):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 8), act(inplace=True), nn.Linear(8, 8), act(inplace=True), nn.Linear(8, 3)
    )
    net, batch = net.double(), data()
    v = [torch.randn_like(p) for p in net.parameters()]
    out = flat(hvp(net, cross_entropy_loss, batch, v, checkpoint=Chain(list(net), cuts=[0, 1, 3])))
    assert rel(out, _mlp_ref(net, batch, v)) < 1e-12


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).double()


def test_planning_and_the_forward_mode_fallback_keep_the_dropout_masks(monkeypatch):
    import torch.autograd.forward_ad as fwad

    net, batch = dropout_mlp(), data()
    v = [torch.randn_like(p) for p in net.parameters()]
    torch.manual_seed(7)
    ref = _mlp_ref(net, batch, v, bn_mode="train")
    torch.manual_seed(7)  # the first product plans and checks the chain: neither may draw masks
    assert rel(flat(hvp(net, cross_entropy_loss, batch, v, checkpoint=True, bn_mode="train")), ref) < 1e-12

    def refuse_after_drawing(*a, **k):
        torch.rand(1)  # a failed forward-mode attempt that had drawn from the RNG already
        raise NotImplementedError("simulated")

    monkeypatch.setattr(fwad, "make_dual", refuse_after_drawing)
    torch.manual_seed(7)
    ch = Chain(list(net), cuts=[0, 2])
    with pytest.warns(RuntimeWarning, match="forward-mode AD failed \\(simulated\\)"):
        out = flat(hvp(net, cross_entropy_loss, batch, v, checkpoint=ch, bn_mode="train"))
    assert rel(out, ref) < 1e-12


def test_the_chain_check_covers_given_cuts_and_train_mode():
    class NoNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n, self.b = nn.Linear(5, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3)
            self.n.running_var.fill_(1 - self.n.eps)  # mean 0, var + eps 1: the identity in eval mode

        def forward(self, x):
            return self.b(torch.tanh(self.n(self.a(x))))

        def hessian_units(self):
            return [self.a, torch.tanh, self.b]  # the BatchNorm is missing: right in eval mode only

    net = NoNorm().double()
    v = [torch.randn_like(p) for p in net.parameters()]
    hvp(net, cross_entropy_loss, data(), v, checkpoint=True)  # eval mode: the chain is right
    with pytest.raises(ValueError, match="does not compute its forward"):
        hvp(net, cross_entropy_loss, data(), v, checkpoint=True, bn_mode="train")
    with pytest.raises(ValueError, match="does not compute its forward"):
        ch = Chain(net.hessian_units(), model=net, cuts=[0, 2])
        hvp(net, cross_entropy_loss, data(), v, checkpoint=ch, bn_mode="train")


def test_a_non_finite_batch_is_reported_not_raised():
    net, (x, y) = dropout_mlp(), data()
    x[0, 0] = float("nan")
    res = top_eigenvalue(net, cross_entropy_loss, [(x, y)], max_iter=3, checkpoint=True)
    assert not res.finite


def test_a_piece_that_depends_on_nothing_gives_zero():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.ones_like(x).detach()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Constant(), nn.Linear(4, 3)).double()
    v = [torch.randn_like(p) for p in net.parameters()]
    ref = _mlp_ref(net, data(), v)
    for cuts in ([0, 2, 3], None):
        out = flat(hvp(net, cross_entropy_loss, data(), v, checkpoint=Chain(list(net), cuts=cuts)))
        assert rel(out, ref) < 1e-12, cuts


def test_a_unit_that_returns_a_tuple_is_named():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    net = nn.Sequential(nn.Linear(5, 3)).double()
    v = [torch.ones_like(p) for p in net.parameters()]
    with pytest.raises(ValueError, match="unit Pair returned tuple"):
        hvp(net, cross_entropy_loss, data(), v, checkpoint=Chain([net[0], Pair()]))


def test_repeated_checks_plan_and_check_the_chain_once(monkeypatch):
    from scaling_abs import _segmented

    planned = []
    original = _segmented.measure
    monkeypatch.setattr(_segmented, "measure", lambda *a: planned.append(1) or original(*a))
    model, batch = bn_cnn_with_stats()
    for _ in range(3):
        top_eigenvalue(model, cross_entropy_loss, [batch], max_iter=2, checkpoint=True)
    assert len(planned) == 1
    model[4] = nn.Linear(3 * 4 * 4, 3).double()  # a changed model is planned (and checked) again
    top_eigenvalue(model, cross_entropy_loss, [batch], max_iter=2, checkpoint=True)
    assert len(planned) == 2
