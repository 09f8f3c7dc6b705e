"""Curvature against exact answers: dense Hessians of small models, closed forms, side effects."""

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from scaling_abs import curvature
from scaling_abs.curvature import (
    cross_entropy_loss,
    hutchinson_trace,
    hvp,
    last_layers,
    resolve_block,
    top_eigenvalue,
    warm_start,
)
from scaling_abs.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["double_backward", "forward_over_reverse"]


def tiny_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def tiny_bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


def conv_bn_conv() -> tuple[nn.Module, tuple]:
    """fp32, a convolution after a BatchNorm (with running statistics): under autocast, batch_norm's
    forward-mode rule gives its bf16 output an fp32 tangent, which the next convolution refuses."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    net.train()(torch.rand(16, 1, 6, 6))
    return net.eval(), (torch.rand(16, 1, 6, 6), torch.randint(0, 3, (16,)))


def data(n: int = 32, seed: int = 1, shape=(5,)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def hvp_of_ones(model: nn.Module, **kw) -> list[torch.Tensor]:
    """``hvp`` on ``data()`` along a vector of ones: for calls that should be refused."""
    return hvp(model, cross_entropy_loss, data(), [torch.ones_like(p) for p in model.parameters()], **kw)


def dense_hessian(model: nn.Module, batch, params=None, bn_mode: str = "eval") -> torch.Tensor:
    """The exact Hessian of the mean cross entropy w.r.t. ``params`` (flattened), in eval mode;
    ``bn_mode="train"``: of a train-mode copy (batch statistics, for models without dropout), whose
    own buffers take the running-statistics updates."""
    params = list(model.parameters()) if params is None else params
    net = copy.deepcopy(model).train() if bn_mode == "train" else model
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    was = model.training
    model.eval()

    def f(flat):
        chunks, i = {}, 0
        for k, s in zip(keys, shapes):
            n = int(torch.Size(s).numel())
            chunks[k] = flat[i : i + n].view(s)
            i += n
        x, y = batch
        return nn.functional.cross_entropy(functional_call(net, chunks, (x,)), y)

    h = torch.autograd.functional.hessian(f, flat0)
    model.train(was)
    return h


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def rademacher(params, n: int, seed: int) -> torch.Tensor:
    """``hutchinson_trace``'s ``n`` probes, flattened (one a row), drawn as it draws them: one CPU
    generator seeded with ``seed``, each probe's tensors in parameter order."""
    gen = torch.Generator().manual_seed(seed)
    rows = [
        flat([(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in params])
        for _ in range(n)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_dense_hessian(method):
    model, batch = tiny_mlp(), data()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    got = flat(hvp(model, cross_entropy_loss, batch, v, method=method))
    expected = dense_hessian(model, batch) @ flat(v)
    # fp64 end to end (the loss too): agreement to rounding
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_block_hvp_is_the_exact_sub_block(method):
    model, batch = tiny_mlp(), data()
    block = last_layers(model, 1)
    assert block == [model[2].weight, model[2].bias]
    v = [torch.ones_like(p) for p in block]
    got = flat(hvp(model, cross_entropy_loss, batch, v, params=block, method=method))
    expected = dense_hessian(model, batch, block) @ flat(v)
    # fp64 end to end (the loss too): agreement to rounding
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_top_eigenvalue_matches_dense_and_is_split_invariant():
    model, (x, y) = tiny_mlp(), data(48)
    exact = torch.linalg.eigvalsh(dense_hessian(model, (x, y)))
    top = exact[exact.abs().argmax()].item()
    whole = top_eigenvalue(model, cross_entropy_loss, [(x, y)], max_iter=500, tol=1e-10)
    # uneven micro-batches, weighted by size: the same Hessian of the mean loss
    split = top_eigenvalue(
        model,
        cross_entropy_loss,
        [(x[:8], y[:8]), (x[8:20], y[8:20]), (x[20:], y[20:])],
        max_iter=500,
        tol=1e-10,
    )
    assert whole.converged and whole.finite and whole.samples == 48
    assert whole.eigenvalue == pytest.approx(top, rel=1e-4)
    assert split.eigenvalue == pytest.approx(whole.eigenvalue, rel=1e-8)
    # the eigenvector satisfies H v = lambda v
    hv = flat(hvp(model, cross_entropy_loss, (x, y), whole.eigenvector))
    torch.testing.assert_close(
        hv.double(), top * flat(whole.eigenvector).double(), rtol=0, atol=1e-3 * abs(top)
    )


def unflat(vec: torch.Tensor, params) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        out.append(vec[i : i + p.numel()].view_as(p).clone())
        i += p.numel()
    return out


def test_warm_start_from_the_eigenvector_converges_at_once_and_still_finds_a_new_top():
    model, batch = tiny_mlp(), data(48)
    params = list(model.parameters())
    values, vectors = torch.linalg.eigh(dense_hessian(model, batch))
    order = values.abs().argsort(descending=True)
    top, second = values[order[0]].item(), values[order[1]].item()
    exact = unflat(vectors[:, order[0]], params)
    # started at the answer: the second Rayleigh quotient equals the first, so it stops there
    res = top_eigenvalue(model, cross_entropy_loss, [batch], init=[3.0 * t for t in exact], tol=1e-8)
    assert res.converged and res.iterations == 2
    assert res.eigenvalue == pytest.approx(top, rel=1e-10)
    # noise=0 is the previous vector itself, normalised
    torch.testing.assert_close(
        flat(warm_start([3.0 * t for t in exact], params, seed=0, noise=0.0)), flat(exact)
    )
    # Started exactly on the second eigenvector, a pure warm start never leaves it (power iteration
    # keeps an eigenvector); the random part brings the top one back into play.
    stuck = unflat(vectors[:, order[1]], params)
    pure = top_eigenvalue(model, cross_entropy_loss, [batch], init=stuck, max_iter=500, tol=1e-12)
    assert pure.eigenvalue == pytest.approx(second, rel=1e-6)
    init = warm_start(stuck, params, seed=3)
    mixed = top_eigenvalue(model, cross_entropy_loss, [batch], init=init, max_iter=500, tol=1e-12)
    assert mixed.eigenvalue == pytest.approx(top, rel=1e-4)


def test_lanczos_matches_dense_and_beats_power_iteration_at_equal_products():
    model, batch = tiny_mlp(), data(48)
    hessian = dense_hessian(model, batch)
    exact = torch.linalg.eigvalsh(hessian)
    top = exact[exact.abs().argmax()].item()
    assert top > 0  # then the top Ritz value is the max of the Rayleigh quotient over the Krylov space
    res = top_eigenvalue(model, cross_entropy_loss, [batch], solver="lanczos", max_iter=60, tol=1e-12)
    assert res.converged and res.finite and res.samples == 48
    assert res.eigenvalue == pytest.approx(top, rel=1e-9)
    assert flat(res.eigenvector).norm().item() == pytest.approx(1.0, rel=1e-9)
    torch.testing.assert_close(
        hessian @ flat(res.eigenvector), top * flat(res.eigenvector), rtol=0, atol=1e-6 * top
    )
    # the power iteration's k-th estimate is a Rayleigh quotient of a vector in the same k-dimensional
    # Krylov space, so from the same start Lanczos is never further from the top
    for k in (2, 3, 5, 8):
        power = top_eigenvalue(model, cross_entropy_loss, [batch], max_iter=k, tol=0.0)
        lanczos = top_eigenvalue(model, cross_entropy_loss, [batch], max_iter=k, tol=0.0, solver="lanczos")
        assert power.iterations == lanczos.iterations == k
        assert power.eigenvalue <= lanczos.eigenvalue <= top * (1 + 1e-12)
    # micro-batch split and the process of reaching it do not matter
    split = top_eigenvalue(
        model,
        cross_entropy_loss,
        [(batch[0][:20], batch[1][:20]), (batch[0][20:], batch[1][20:])],
        solver="lanczos",
        max_iter=60,
        tol=1e-12,
    )
    assert split.eigenvalue == pytest.approx(res.eigenvalue, rel=1e-9)


def test_warm_start_and_init_reject_bad_vectors():
    model, batch = tiny_mlp(), data()
    params = list(model.parameters())
    zeros = [torch.zeros_like(p) for p in params]
    with pytest.raises(ValueError, match="init: expected 4 tensors"):
        top_eigenvalue(model, cross_entropy_loss, [batch], init=zeros[:3])
    with pytest.raises(ValueError, match="zero or not finite"):
        top_eigenvalue(model, cross_entropy_loss, [batch], init=zeros)
    with pytest.raises(ValueError, match="previous: expected"):
        warm_start([torch.ones(2)], params, seed=0)
    with pytest.raises(ValueError, match="noise"):
        warm_start(zeros, params, seed=0, noise=-1.0)
    with pytest.raises(ValueError, match="solver"):
        top_eigenvalue(model, cross_entropy_loss, [batch], solver="arnoldi")


def test_block_eigenvalue_matches_dense_sub_block():
    model, batch = tiny_mlp(), data()
    block = last_layers(model, 1)
    exact = torch.linalg.eigvalsh(dense_hessian(model, batch, block))
    res = top_eigenvalue(model, cross_entropy_loss, [batch], params=block, max_iter=500, tol=1e-10)
    assert res.eigenvalue == pytest.approx(exact[exact.abs().argmax()].item(), rel=1e-4)


def test_seeded_and_does_not_touch_global_rng():
    model, batch = tiny_mlp(), data()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = top_eigenvalue(model, cross_entropy_loss, [batch], max_iter=3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = top_eigenvalue(model, cross_entropy_loss, [batch], max_iter=3, seed=7)
    c = top_eigenvalue(model, cross_entropy_loss, [batch], max_iter=3, seed=8)
    assert a.eigenvalue == b.eigenvalue and a.eigenvalue != c.eigenvalue


@pytest.mark.parametrize("reuse_graph", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_reused_graph_gives_the_fresh_products(reuse_graph, splits):
    """Differentiating a kept gradient graph again is the same HVP as a new forward and backward:
    each setting's products against the dense Hessian of the whole batch (a kept graph three times
    over), its trace against the dense one of the same probes, and its estimates against the other
    setting's."""
    model, (x, y) = tiny_mlp(), data(48)
    params = list(model.parameters())
    bounds = torch.linspace(0, 48, splits + 1).long().tolist()
    batches = [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
    hessian = dense_hessian(model, (x, y))
    op = curvature.HessianOperator(model, cross_entropy_loss, batches, params, reuse_graph=reuse_graph)
    assert op.reuse_graph is reuse_graph
    probes = rademacher(params, 3, seed=0)
    for z in probes:
        torch.testing.assert_close(flat(op(unflat(z, params))), hessian @ z, rtol=1e-10, atol=1e-12)
    trace = hutchinson_trace(model, cross_entropy_loss, batches, n_samples=3, reuse_graph=reuse_graph)
    assert trace.trace == pytest.approx(((probes @ hessian) * probes).sum(1).mean().item(), rel=1e-10)
    ref = top_eigenvalue(model, cross_entropy_loss, batches, max_iter=30, tol=0, reuse_graph=not reuse_graph)
    res = top_eigenvalue(model, cross_entropy_loss, batches, max_iter=30, tol=0, reuse_graph=reuse_graph)
    assert res.eigenvalue == pytest.approx(ref.eigenvalue, rel=1e-12)
    torch.testing.assert_close(flat(res.eigenvector), flat(ref.eigenvector), rtol=1e-10, atol=1e-12)


def test_reuse_graph_auto_keeps_one_micro_batch_and_bad_values_raise():
    model, (x, y) = tiny_mlp(), data()
    params = list(model.parameters())
    one = curvature.HessianOperator(model, cross_entropy_loss, [(x, y)], params)
    two = curvature.HessianOperator(model, cross_entropy_loss, [(x[:8], y[:8]), (x[8:], y[8:])], params)
    fwd = curvature.HessianOperator(
        model, cross_entropy_loss, [(x, y)], params, method="forward_over_reverse", reuse_graph=True
    )
    assert one.reuse_graph and not two.reuse_graph and not fwd.reuse_graph
    v = [torch.ones_like(p) for p in params]
    first, second = flat(one(v)), flat(one(v))  # the kept graph survives repeated products
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    one.release()
    torch.testing.assert_close(flat(one(v)), first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reuse_graph"):
        curvature.HessianOperator(model, cross_entropy_loss, [(x, y)], params, reuse_graph="yes")
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    assert top_eigenvalue(model, cross_entropy_loss, [(x, y)], max_iter=2).kept_graphs == 1
    assert top_eigenvalue(model, cross_entropy_loss, halves, max_iter=2).kept_graphs == 0


@pytest.mark.parametrize("availability", [[900, 260, 100], [100], [900] * 4])
def test_auto_on_a_measured_device_keeps_the_graphs_that_fit(monkeypatch, availability):
    """``reuse_graph="auto"`` with several micro-batches where the device's memory can be read (CUDA;
    here a stand-in): the first product keeps each graph while twice its size and FIT_RESERVE of the
    device remain free after it; from the first that does not fit on, products are fresh. Every mix
    gives the dense Hessian's products, and later products the same as the first."""
    readings = iter([r for a in availability for r in ((0, 0, 1000), (100, a, 1000))] * 2)
    monkeypatch.setattr(curvature, "_device_memory", lambda device: next(readings))
    monkeypatch.setattr(curvature, "MEASURED_DEVICES", ("cpu",))
    model, (x, y) = tiny_mlp(), data(48)
    params = list(model.parameters())
    batches = [(x[i : i + 12], y[i : i + 12]) for i in range(0, 48, 12)]
    op = curvature.HessianOperator(model, cross_entropy_loss, batches, params)
    assert op.reuse_graph == "fit" and op.kept_graphs == 0
    hessian = dense_hessian(model, (x, y))
    z = rademacher(params, 1, seed=3)[0]
    first = flat(op(unflat(z, params)))
    kept = sum(1 for _ in itertools.takewhile(lambda a: a >= 2 * 100 + 50, availability))
    assert op.kept_graphs == kept  # 2, 0 and 4 of the 4 micro-batches
    torch.testing.assert_close(first, hessian @ z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(op(unflat(z, params))), first, rtol=0, atol=0)  # no new readings
    op.release()
    assert op.kept_graphs == 0
    torch.testing.assert_close(flat(op(unflat(z, params))), first, rtol=1e-12, atol=1e-14)
    assert op.kept_graphs == kept  # built again after release, as many as fit


def test_reused_graph_under_bf16_is_close_to_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    full = top_eigenvalue(model, cross_entropy_loss, [(x, y)], max_iter=20, tol=0, reuse_graph=False)
    half = top_eigenvalue(
        model,
        cross_entropy_loss,
        [(x, y)],
        max_iter=20,
        tol=0,
        reuse_graph=True,
        autocast_dtype=torch.bfloat16,
    )
    assert half.finite and 1e-5 < abs(half.eigenvalue / full.eigenvalue - 1) < 2e-2  # bf16: 2e-4 off here


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("method", ["auto", *METHODS])
@pytest.mark.parametrize("reuse_graph", ["auto", True])
def test_no_side_effects(bn_mode, method, reuse_graph):
    model = tiny_bn_cnn()
    x, y = data(16, shape=(1, 6, 6))
    model.train()
    model[2].eval()  # a mixed-mode model must come back mixed
    model(x)  # give BatchNorm non-trivial running stats
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {k: v.clone() for k, v in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    kw = {"method": method, "bn_mode": bn_mode, "reuse_graph": reuse_graph}
    res = top_eigenvalue(model, cross_entropy_loss, batches, max_iter=3, **kw)
    hutchinson_trace(model, cross_entropy_loss, batches, n_samples=2, **kw)

    assert res.finite
    assert [m.training for m in model.modules()] == modes
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), k
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("0.weight"))
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_bn_mode_uses_batch_statistics():
    """bn_mode="train" is the exact Hessian of the loss on batch statistics (their dependence on the
    parameters differentiated too) for each method (forward-over-reverse clones buffers), and not
    eval mode's; differing from eval mode alone would pass a wrong product."""
    model = tiny_bn_cnn()
    x, y = data(16, shape=(1, 6, 6))
    ev = top_eigenvalue(model, cross_entropy_loss, [(x, y)], max_iter=20, tol=0, bn_mode="eval")
    tr = top_eigenvalue(model, cross_entropy_loss, [(x, y)], max_iter=20, tol=0, bn_mode="train")
    assert ev.eigenvalue != pytest.approx(tr.eigenvalue, rel=1e-6)
    expected = dense_hessian(model, (x, y), bn_mode="train")
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    for method in METHODS:
        got = flat(hvp(model, cross_entropy_loss, (x, y), v, method=method, bn_mode="train"))
        # fp64 end to end (the loss too): agreement to rounding
        torch.testing.assert_close(got, expected @ flat(v), rtol=1e-10, atol=1e-12)


class Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


def test_activation_checkpointing_gives_the_same_hvp():
    model, batch = tiny_mlp(), data()
    wrapped = Checkpointed(model)
    v = [torch.ones_like(p) for p in model.parameters()]
    plain = flat(hvp(model, cross_entropy_loss, batch, v, method="double_backward"))
    ckpt = flat(hvp(wrapped, cross_entropy_loss, batch, v, method="auto"))  # auto falls back if needed
    torch.testing.assert_close(ckpt, plain, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_hvp_is_close_to_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    v = [torch.randn_like(p) for p in model.parameters()]
    full = flat(hvp(model, cross_entropy_loss, (x, y), v))
    half = flat(hvp(model, cross_entropy_loss, (x, y), v, autocast_dtype=torch.bfloat16))
    assert half.dtype == torch.float32
    assert 1e-4 < (half - full).norm() / full.norm() < 2e-2  # bf16 (5e-3 off here), so not fp32's product


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_forward_over_reverse_under_autocast_with_batchnorm(dtype, bn_mode):
    net, batch = conv_bn_conv()
    v = [torch.randn_like(p) for p in net.parameters()]
    kw = {"autocast_dtype": dtype, "bn_mode": bn_mode}
    ref = flat(hvp(net, cross_entropy_loss, batch, v, method="double_backward", **kw))
    out = flat(hvp(net, cross_entropy_loss, batch, v, method="forward_over_reverse", **kw))
    assert (out - ref).norm() / ref.norm() < 2e-2  # bf16 is 7-11 % off fp32 here: same precision


def test_forward_over_reverse_under_autocast_with_layernorm():
    """LayerNorm runs in fp32 under autocast while its input's tangent is bf16: the next Linear
    refused the mix inside torch.func's backward ("expected m1 and m2 to have the same dtype")."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.GroupNorm(4, 16), nn.Linear(16, 3))
    batch = torch.randn(32, 8), torch.randint(0, 3, (32,))
    v = [torch.randn_like(p) for p in net.parameters()]
    kw = {"autocast_dtype": torch.bfloat16}
    ref = flat(hvp(net, cross_entropy_loss, batch, v, method="double_backward", **kw))
    out = flat(hvp(net, cross_entropy_loss, batch, v, method="forward_over_reverse", **kw))
    assert (out - ref).norm() / ref.norm() < 2e-2


def test_fp16_products_of_long_vectors_stay_finite():
    """fp16 with train-mode BatchNorm overflowed for a random vector of norm 25 (and for every
    Hutchinson probe); products are now taken of the unit vector and scaled back."""
    net, batch = conv_bn_conv()
    v = [torch.randn_like(p) * 10 for p in net.parameters()]
    kw = {"method": "double_backward", "bn_mode": "train"}
    ref = flat(hvp(net, cross_entropy_loss, batch, v, **kw))
    half = flat(hvp(net, cross_entropy_loss, batch, v, autocast_dtype=torch.float16, **kw))
    assert torch.isfinite(half).all()
    assert 1e-4 < (half - ref).norm() / ref.norm() < 2e-2  # fp16 (1.4e-3 off here), so not fp32's product
    full, low = (
        hutchinson_trace(net, cross_entropy_loss, [batch], n_samples=4, bn_mode="train", autocast_dtype=d)
        for d in (None, torch.float16)
    )
    # fp16 (5e-5 off here: z^T H z averages the products' rounding out), so not fp32's trace
    assert low.finite and 5e-6 * abs(full.trace) < abs(low.trace - full.trace) < 2e-2 * abs(full.trace)


def test_fp16_forward_over_reverse_is_loss_scaled():
    """Without double backward's loss scale, the unit vector's fp16 product underflowed: 3.6-5.2 %
    off fp32 on this model against 0.7-0.9 % with it."""
    from scaling_abs.models import build_model

    torch.manual_seed(0)
    net = build_model("c2", num_classes=10, in_channels=3, image_size=32)
    net.train()(torch.rand(16, 3, 32, 32))
    net.eval()
    batch = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    v = [torch.randn_like(p) for p in net.parameters()]
    ref = flat(hvp(net, cross_entropy_loss, batch, v, method="double_backward"))
    half = flat(
        hvp(net, cross_entropy_loss, batch, v, method="forward_over_reverse", autocast_dtype=torch.float16)
    )
    # fp16 (7.8e-3 off here), so not fp32's product (8e-5 off: the two methods' fp32 rounding)
    assert 5e-4 < (half - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_non_finite_is_reported_not_raised(solver):
    model = tiny_mlp()
    x, y = data()
    x[0, 0] = float("inf")
    res = top_eigenvalue(model, cross_entropy_loss, [(x, y)], max_iter=3, solver=solver)
    assert not res.finite and not res.converged and res.eigenvalue != res.eigenvalue  # NaN


def test_hutchinson_trace_matches_dense_trace():
    """The estimate is the mean of z^T H z over the seeded Rademacher probes to rounding, not only
    within its own error bar (about 30 % of the trace here), and the error bar is their standard
    error: a biased or mis-seeded estimator fits inside 4 standard errors."""
    model, batch = tiny_mlp(), data()
    hessian = dense_hessian(model, batch)
    est = hutchinson_trace(model, cross_entropy_loss, [batch], n_samples=400, seed=0)
    z = rademacher(list(model.parameters()), 400, seed=0)
    quad = ((z @ hessian) * z).sum(1)  # z^T H z per probe
    assert est.probes == 400 and est.finite
    assert est.trace == pytest.approx(quad.mean().item(), rel=1e-10)
    assert est.std_error == pytest.approx(quad.std().item() / 400**0.5, rel=1e-10)
    assert abs(est.trace - torch.trace(hessian).item()) < 4 * est.std_error


def test_vit_attention_in_hvp_matches_between_methods():
    """Double backward through the math attention kernel against forward-over-reverse, asked for by
    name (on the CPU "auto" is double backward itself), w.r.t. every parameter: the last two layers
    alone (a LayerNorm and the head) put no second derivative through attention."""
    from scaling_abs.models import build_model

    torch.manual_seed(0)
    model = build_model("vit_tiny", num_classes=3, in_channels=1, image_size=8)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4,))
    v = [torch.randn_like(p) for p in model.parameters()]
    a = flat(hvp(model, cross_entropy_loss, (x, y), v, method="double_backward"))
    b = flat(hvp(model, cross_entropy_loss, (x, y), v, method="forward_over_reverse"))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_block_helpers_and_bad_arguments():
    model = tiny_mlp()
    assert resolve_block(model, "all") == list(model.parameters())
    assert resolve_block(model, "last:2") == list(model.parameters())
    for bad in ("first:1", "last:0", "last:x"):
        with pytest.raises(ValueError, match="hessian_block"):
            resolve_block(model, bad)
    with pytest.raises(ValueError, match="n must be"):
        last_layers(model, 0)
    with pytest.raises(ValueError, match="method"):
        hvp_of_ones(model, method="magic")
    with pytest.raises(ValueError, match="bn_mode"):
        top_eigenvalue(model, cross_entropy_loss, [data()], bn_mode="frozen")


@pytest.mark.slow
def test_two_processes_give_the_one_process_eigenvalue(tmp_path):
    model, (x, y) = tiny_mlp(), data(40)
    one = top_eigenvalue(model, cross_entropy_loss, [(x[:20], y[:20]), (x[20:], y[20:])], max_iter=30, tol=0)
    worker = ROOT / "tests" / "_dist_curvature_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(worker),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["eigenvalue"] == got[1]["eigenvalue"]
    assert got[0]["samples"] == 40
    assert got[0]["eigenvalue"] == pytest.approx(one.eigenvalue, rel=1e-4)
    # Lanczos keeps the ranks in step too (the same basis everywhere: all-reduced products)
    halves = [(x[:20], y[:20]), (x[20:], y[20:])]
    one_lanczos = top_eigenvalue(model, cross_entropy_loss, halves, max_iter=30, tol=1e-10, solver="lanczos")
    assert got[0]["lanczos"] == got[1]["lanczos"]
    assert got[0]["lanczos"] == pytest.approx(one_lanczos.eigenvalue, rel=1e-9)


def test_curvature_module_exposes_contract_names():
    for name in (
        "hvp",
        "top_eigenvalue",
        "last_layers",
        "cross_entropy_loss",
        "EigenResult",
        "hutchinson_trace",
    ):
        assert hasattr(curvature, name)


def test_auto_settles_on_a_method_and_matches_it():
    model, batch = tiny_mlp(seed=3), data()
    model.extra = nn.Identity()  # a distinct architecture key for this test
    v = [torch.ones_like(p) for p in model.parameters()]
    auto = flat(hvp(model, cross_entropy_loss, batch, v, method="auto"))
    assert curvature.auto_choice(model) == "double_backward"  # CPU: measured faster, no timing
    torch.testing.assert_close(auto, flat(hvp(model, cross_entropy_loss, batch, v, method="double_backward")))
    # forward-over-reverse cannot run through activation checkpointing: auto must not pick it there
    ckpt = Checkpointed(tiny_mlp(seed=3))
    with pytest.raises(RuntimeError, match="saved tensor hooks"):
        hvp(ckpt, cross_entropy_loss, batch, v, method="forward_over_reverse")
    hvp(ckpt, cross_entropy_loss, batch, v, method="auto")
    assert curvature.auto_choice(ckpt) == "double_backward"


def test_auto_times_both_methods_where_it_has_no_fixed_choice(monkeypatch):
    """On a GPU ``auto`` times both methods at a kind of model's first product and keeps the faster,
    and falls back to double backward where forward-over-reverse raises (activation checkpointing).
    Run here on the CPU with its fixed choice taken away; the timing itself decides nothing tested."""
    monkeypatch.setattr(curvature, "AUTO_UNTIMED", {})
    monkeypatch.setattr(curvature, "_AUTO_CHOICE", {})
    calls = {"double_backward": 0, "forward_over_reverse": 0}
    for name in calls:
        original = getattr(curvature, f"_{name}")

        def counting(*args, original=original, name=name):
            calls[name] += 1
            return original(*args)

        monkeypatch.setattr(curvature, f"_{name}", counting)
    model, batch = tiny_mlp(seed=3), data()
    v = [torch.ones_like(p) for p in model.parameters()]
    expected = dense_hessian(model, batch) @ flat(v)
    auto = flat(hvp(model, cross_entropy_loss, batch, v, method="auto"))
    assert calls == {"double_backward": 2, "forward_over_reverse": 2}  # a warm-up and a timed run each
    choice = curvature.auto_choice(model)
    assert choice in ("double_backward", "forward_over_reverse")
    torch.testing.assert_close(auto, expected, rtol=1e-5, atol=1e-6)
    hvp(model, cross_entropy_loss, batch, v, method="auto")  # settled: one run of the chosen method
    assert calls[choice] == 3 and sum(calls.values()) == 5
    ckpt = Checkpointed(tiny_mlp(seed=3))
    got = flat(hvp(ckpt, cross_entropy_loss, batch, v, method="auto"))
    assert curvature.auto_choice(ckpt) == "double_backward"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_hessian_operator_used_directly_runs_attention_models():
    # Flash attention has no double backward; the operator itself picks the math kernel, not only
    # the functions that wrap it (top_eigenvalue, hvp).
    from scaling_abs.models import build_model

    model = build_model("vit_tiny", num_classes=3, in_channels=1, image_size=8).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4,))
    params = list(model.parameters())
    v = [torch.ones_like(p) for p in params]
    for reuse in (True, False):
        op = curvature.HessianOperator(model, cross_entropy_loss, [(x, y)], params, reuse_graph=reuse)
        got = flat(op(v))
        want = flat(hvp(model, cross_entropy_loss, (x, y), v, params=params, method="double_backward"))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_power_iteration_keeps_no_copy_of_the_product(monkeypatch, micro_batches):
    """Memory: each product becomes the next vector in place (not a normalised copy beside it), and
    the operator's sum is the first micro-batch's product itself (not a zero vector added to).
    The estimate is still the dense Hessian's top eigenvalue."""
    model = tiny_mlp()
    x, y = data()
    batches = list(zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)))
    products, sums = [], []
    hvp_of, call = curvature.HessianOperator._hvp, curvature.HessianOperator.__call__
    monkeypatch.setattr(
        curvature.HessianOperator, "_hvp", lambda self, *a: products.append(hvp_of(self, *a)) or products[-1]
    )
    monkeypatch.setattr(
        curvature.HessianOperator, "__call__", lambda self, v: sums.append(call(self, v)) or sums[-1]
    )
    res = top_eigenvalue(model, cross_entropy_loss, batches, max_iter=300, tol=0.0)
    assert len(sums) == res.iterations and len(products) == res.iterations * micro_batches
    for first, total in zip(products[::micro_batches], sums):
        assert all(a is b for a, b in zip(first, total))
    assert all(a is b for a, b in zip(res.eigenvector, sums[-1]))
    top = torch.linalg.eigvalsh(dense_hessian(model, (x, y)))
    assert res.eigenvalue == pytest.approx(float(top[top.abs().argmax()]), rel=1e-6)


def test_params_that_are_not_the_models_own_trainable_ones_are_refused():
    # each of these used to give a zero block and a "converged" eigenvalue of 0, or a deep torch error
    model, other = tiny_mlp(), tiny_mlp(seed=1)
    batch = data()
    frozen = tiny_mlp()
    frozen[0].weight.requires_grad_(False)
    for params, error, match in [
        (model[2].weight, TypeError, "one tensor"),
        ([other[2].weight], ValueError, r"params\[0\]: not a parameter of the model"),
        ([model[2].weight, model[2].weight], ValueError, r"params\[1\]: given twice"),
        (list(model.named_parameters()), TypeError, "named_parameters"),
    ]:
        with pytest.raises(error, match=match):
            top_eigenvalue(model, cross_entropy_loss, [batch], params=params)
    with pytest.raises(ValueError, match=r"params\[0\]: does not require grad"):
        top_eigenvalue(frozen, cross_entropy_loss, [batch], params=list(frozen.parameters()))
    with pytest.raises(ValueError, match="not a parameter"):
        hvp(model, cross_entropy_loss, batch, [torch.ones_like(other[2].weight)], params=[other[2].weight])


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), "scalar tensor"),
        (lambda m, b: 1.0, "scalar tensor"),
        (lambda m, b: cross_entropy_loss(m, b).detach(), "does not depend on the parameters"),
    ],
)
def test_a_loss_fn_that_gives_no_scalar_with_a_graph(loss_fn, match):
    with pytest.raises(ValueError, match=match):
        top_eigenvalue(tiny_mlp(), loss_fn, [data()])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "forward-over-reverse"}, "method must be one of"),  # one micro-batch: kept graph
        ({"autocast_dtype": torch.float64}, "autocast_dtype"),
        ({"tol": -1.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iter": 2.5}, "max_iter"),
    ],
)
def test_settings_are_checked_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        top_eigenvalue(tiny_mlp(), cross_entropy_loss, [data()], **kwargs)


def test_bn_mode_train_keeps_dropout_off():
    """Batch statistics, not random masks: with dropout in the model the Hessian must not depend on
    how the batch is split or whether graphs are kept (it did while bn_mode="train" switched the
    whole model to train mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    x, y = data()
    kw = {"max_iter": 30, "tol": 1e-10, "bn_mode": "train"}
    one = top_eigenvalue(model, cross_entropy_loss, [(x, y)], **kw).eigenvalue
    two = top_eigenvalue(model, cross_entropy_loss, [(x[:16], y[:16]), (x[16:], y[16:])], **kw).eigenvalue
    fresh = top_eigenvalue(model, cross_entropy_loss, [(x, y)], reuse_graph=False, **kw).eigenvalue
    evaluated = top_eigenvalue(model, cross_entropy_loss, [(x, y)], **{**kw, "bn_mode": "eval"}).eigenvalue
    assert one == pytest.approx(two, rel=1e-9) and one == pytest.approx(fresh, rel=1e-9)
    assert one == pytest.approx(evaluated, rel=1e-9)  # no BatchNorm here: the same Hessian


def test_last_layers_count_weight_layers_and_take_their_normalization_along():
    """The paper's "last two layers" (Section 4.3): BatchNorm is part of the layer it follows, not a
    layer of its own (ResNet-18's last:2 was its last BatchNorm and the classifier, 6,154 of 11.2 M
    parameters)."""
    from scaling_abs.models import build_model

    model = tiny_bn_cnn()
    conv, bn, linear = model[0], model[1], model[4]
    assert last_layers(model, 1) == [linear.weight, linear.bias]
    assert last_layers(model, 2) == [conv.weight, conv.bias, bn.weight, bn.bias, linear.weight, linear.bias]
    assert last_layers(model, 5) == list(model.parameters())
    norms = nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4))  # normalization layers only: they count
    assert last_layers(norms, 1) == list(norms[1].parameters())
    resnet = build_model("c1", num_classes=10, in_channels=3, image_size=32)
    names = {id(p): n for n, p in resnet.named_parameters()}
    assert [names[id(p)] for p in last_layers(resnet, 2)] == [
        "model.layer4.1.conv2.weight",
        "model.layer4.1.bn2.weight",
        "model.layer4.1.bn2.bias",
        "model.fc.weight",
        "model.fc.bias",
    ]


def test_last_layers_lists_a_tied_weight_once():
    torch.manual_seed(0)
    embed, head = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(nn.Linear(4, 4), embed, nn.Tanh(), head)
    params = last_layers(model, 2)
    assert len(params) == 1 and params[0] is embed.weight
    x, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    assert top_eigenvalue(model, cross_entropy_loss, [(x, y)], params=params).finite
