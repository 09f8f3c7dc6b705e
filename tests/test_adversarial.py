import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaling_abs.adversarial import adversarial_count, adversarial_rows, fgsm, mix_adversarial


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(6, 4).double()


def test_fgsm_matches_closed_form_on_a_linear_model():
    model = linear_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 6, generator=g, dtype=torch.float64) * 0.8 + 0.1  # away from the bounds
    y = torch.randint(0, 4, (8,), generator=g)
    eps = 0.05
    # d/dx mean CE(Wx + b, y) = W^T (softmax(Wx + b) - onehot(y)) / n
    p = torch.softmax(x @ model.weight.T + model.bias, dim=1)
    grad = (p - F.one_hot(y, 4).double()) @ model.weight / x.shape[0]
    expected = (x + eps * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm(model, x, y, eps), expected, rtol=0, atol=1e-12)


def test_fgsm_clamps_to_bounds():
    model = linear_model()
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.5, 0.5]], dtype=torch.float64)
    out = fgsm(model, x, torch.tensor([1]), eps=0.5, bounds=(0.0, 1.0))
    assert out.min() >= 0.0 and out.max() <= 1.0
    out2 = fgsm(model, x, torch.tensor([1]), eps=0.3, bounds=(0.2, 0.7))
    assert out2.min() >= 0.2 and out2.max() <= 0.7


def test_fgsm_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    model.train()
    model[2].eval()
    model(torch.rand(4, 1, 6, 6))
    model[0].weight.grad = torch.ones_like(model[0].weight)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {k: v.clone() for k, v in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 3, (4,))
    out = fgsm(model, x, y, 0.01)
    assert not out.requires_grad and out.shape == x.shape
    assert [m.training for m in model.modules()] == modes
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[4].weight.grad is None
    # eval mode: the perturbation uses running statistics, so it does not depend on the other rows
    alone = fgsm(model, x[:1], y[:1], 0.01)
    torch.testing.assert_close(alone, out[:1])


def test_fgsm_under_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.rand(5, 1, 4, 4), torch.randint(0, 3, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fgsm(model, x, y, 0.01)
    assert out.dtype == x.dtype
    delta = (out - x).abs()
    assert torch.all(delta <= 0.01 + 1e-6)
    assert (delta > 0).float().mean() > 0.5


def test_fgsm_under_fp16_autocast_perturbs_well_classified_examples():
    """fp16 without loss scaling: a well-classified example's input gradient underflowed to 0, its
    sign too, and the example stayed clean (a third to a half of a trained CNN's rows). The scaled
    loss gives fp32's signs; an overflow of the scale falls back to fp32."""
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.4] * 8, [-1.4] * 8]))  # margin ~17: p(wrong) ~ 4e-8
        model.bias.zero_()
    x = torch.rand(16, 8) * 0.02 + 0.75
    y = torch.zeros(16, dtype=torch.long)
    clean = fgsm(model, x, y, 0.005)
    assert (clean != x).all()  # fp32: every pixel moves
    with torch.autocast("cpu", dtype=torch.float16):
        (raw,) = torch.autograd.grad(F.cross_entropy(model(x.requires_grad_()), y), x)
        assert (raw == 0).all()  # what an unscaled fp16 gradient gives here
        x.requires_grad_(False)
        torch.testing.assert_close(fgsm(model, x, y, 0.005), clean, rtol=0, atol=0)
        big = nn.Linear(8, 2)
        with torch.no_grad():
            big.weight.copy_(torch.tensor([[6e4] * 8, [0.0] * 8]))  # the scaled gradient overflows
            big.bias.zero_()
        torch.testing.assert_close(fgsm(big, x, y.fill_(1), 0.005), fgsm_fp32(big, x, y), rtol=0, atol=0)


def fgsm_fp32(model, x, y):
    with torch.autocast("cpu", enabled=False):
        return fgsm(model, x, y, 0.005)


@pytest.mark.parametrize(
    "n, fraction, k", [(10, 0.2, 2), (128, 0.2, 26), (7, 0.0, 0), (7, 1.0, 7), (3, 0.01, 1)]
)
def test_adversarial_count_is_ceil(n, fraction, k):
    assert adversarial_count(n, fraction) == k


def test_mix_replaces_evenly_spaced_rows_only():
    model = linear_model()
    x = torch.rand(10, 6, dtype=torch.float64) * 0.8 + 0.1
    y = torch.randint(0, 4, (10,))
    mixed = mix_adversarial(model, x, y, 0.2, 0.05)
    rows, others = [0, 5], [1, 2, 3, 4, 6, 7, 8, 9]
    torch.testing.assert_close(mixed[rows], fgsm(model, x[rows], y[rows], 0.05))
    assert torch.equal(mixed[others], x[others])
    assert not torch.equal(mixed[rows], x[rows])
    assert mix_adversarial(model, x, y, 0.0, 0.05) is x


@pytest.mark.parametrize(
    "batch, fraction", [(128, 0.2), (256, 0.2), (256, 0.025), (2048, 0.0125), (1000, 0.33), (7, 1.0)]
)
def test_adversarial_rows_do_not_depend_on_the_split(batch, fraction):
    """ceil(fraction * B) rows of the global batch, evenly spaced, the same ones whatever the
    micro-batches and processes (each piece rounding up on its own gave 52 of 256 rows at 0.2 on
    one process and 128 on 128 processes)."""
    whole = adversarial_rows(batch, fraction, 0, batch).tolist()
    assert len(whole) == adversarial_count(batch, fraction)
    gaps = {b - a for a, b in zip(whole, whole[1:])}
    assert not gaps or max(gaps) - min(gaps) <= 1
    for size in (1, 2, 3, 16, 40, 64):
        if batch % size == 0:
            pieces = [
                o + i
                for o in range(0, batch, size)
                for i in adversarial_rows(batch, fraction, o, size).tolist()
            ]
            assert pieces == whole, size


def test_a_micro_batch_mixes_its_rows_of_the_global_batch():
    model = linear_model()
    x = torch.rand(12, 6, dtype=torch.float64) * 0.8 + 0.1
    y = torch.randint(0, 4, (12,))
    whole = mix_adversarial(model, x, y, 0.25, 0.05)
    pieces = [
        mix_adversarial(model, x[o : o + 4], y[o : o + 4], 0.25, 0.05, global_batch=12, offset=o)
        for o in (0, 4, 8)
    ]
    torch.testing.assert_close(torch.cat(pieces), whole)
    assert int((whole != x).any(dim=1).sum()) == 3
    with pytest.raises(ValueError, match="not inside a global batch of 12"):
        mix_adversarial(model, x[:4], y[:4], 0.25, 0.05, global_batch=12, offset=10)


def test_bad_arguments():
    model = linear_model()
    x, y = torch.rand(2, 6, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match="fraction"):
        mix_adversarial(model, x, y, 1.5, 0.1)
    assert torch.equal(fgsm(model, x, y, 0.0), x)


def test_bad_steps_and_bounds_are_refused_even_when_nothing_is_replaced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    for kwargs, match in [
        ({"eps": float("nan")}, "eps"),
        ({"eps": 0.1, "bounds": (1.0, 0.0)}, "bounds"),
    ]:
        with pytest.raises(ValueError, match=match):
            fgsm(model, x, y, **kwargs)
    with pytest.raises(ValueError, match="eps"):
        mix_adversarial(model, x, y, 0.0, -0.1)
    assert mix_adversarial(model, x, y, 0.0, 0.1) is x  # nothing replaced: the batch itself
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        fgsm(model, x, y, 0.1)
