"""What must hold on a CUDA device (issue 5): the HVP paths against fp64, bf16 checks against fp32,
and a training run with checks under bf16. Marked ``gpu``: skipped without CUDA (CI has none);
``SCALING_ABS_TEST_DEVICE=cpu`` runs them on the CPU to check the tests themselves. On a GPU:

    python -m pytest -q -m gpu tests/test_gpu.py
"""

import copy
import json
import os

import pytest
import torch

from scaling_abs.config import load_config
from scaling_abs.curvature import HessianOperator, _checking, cross_entropy_loss, hvp, top_eigenvalue
from scaling_abs.models import build_model
from scaling_abs.trainer import train
from tests.test_segmented import relu_margin

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get("SCALING_ABS_TEST_DEVICE", "cuda"))


@pytest.fixture
def exact_fp32():
    """TF32 off for convolutions and matmuls (restored after): fp32 that is fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cnn_and_batch(n: int = 64):
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=28).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 28, 28, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (n,), generator=g).to(DEVICE)
    return model, (x, y)


def rel(a, b) -> float:
    num = sum(((u.double() - w.double()) ** 2).sum() for u, w in zip(a, b)) ** 0.5
    return float(num / sum((w.double() ** 2).sum() for w in b) ** 0.5)


def test_every_fp32_hvp_path_matches_fp64(exact_fp32):
    model, (x, y) = cnn_and_batch()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g).to(DEVICE) for p in params]
    ref = hvp(copy.deepcopy(model).double(), cross_entropy_loss, (x.double(), y), [t.double() for t in v])
    for method in ("double_backward", "forward_over_reverse", "auto"):
        assert rel(hvp(model, cross_entropy_loss, (x, y), v, method=method), ref) < 1e-5, method
    for rules in (True, False):  # our second-order rules for convolutions / BatchNorm, and PyTorch's
        got = hvp(model, cross_entropy_loss, (x, y), v, method="double_backward", custom_rules=rules)
        assert rel(got, ref) < 1e-5, f"custom_rules={rules}"
    for rules in (True, False):  # checkpointed: the model recomputed piece by piece
        got = hvp(model, cross_entropy_loss, (x, y), v, checkpoint=True, custom_rules=rules)
        assert rel(got, ref) < 1e-5, f"checkpoint, custom_rules={rules}"
    whole, quarters = [(x, y)], list(zip(x.tensor_split(4), y.tensor_split(4)))
    with _checking(model, "eval", True):
        for batches, reuse in ((whole, True), (quarters, False), (quarters, "auto")):
            op = HessianOperator(model, cross_entropy_loss, batches, params, reuse_graph=reuse)
            op(v)  # the kept graph is built at the first product
            assert rel(op(v), ref) < 1e-5, f"reuse_graph={reuse}"
        if DEVICE.type == "cuda":  # the quarters' graphs fit (elsewhere: fresh products)
            assert op.reuse_graph == "fit" and op.kept_graphs == 4


def test_checkpointed_hvp_takes_less_memory_than_a_fresh_one(exact_fp32):
    """ResNet-18 at 256 images: the checkpointed product's peak (CUDA allocator) below the plain one's."""
    if DEVICE.type != "cuda":
        pytest.skip("reads the CUDA allocator's statistics")
    torch.manual_seed(0)
    model = build_model("c1", num_classes=10, in_channels=3, image_size=32).to(DEVICE)
    x, y = torch.rand(256, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (256,), device=DEVICE)
    v = [torch.randn_like(p) for p in model.parameters()]
    peaks = {}
    for ckpt in (False, True):
        hvp(model, cross_entropy_loss, (x, y), v, checkpoint=ckpt)  # warm-up (and the cuts' plan)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hvp(model, cross_entropy_loss, (x, y), v, checkpoint=ckpt)
        peaks[ckpt] = torch.cuda.max_memory_allocated() - base
    assert peaks[True] < 0.8 * peaks[False], peaks


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_checkpointed_resnet18_hvp_equals_the_plain_one(exact_fp32, bn_mode):
    """On a batch with no ReLU input near 0 (tests/test_segmented.py's case, built on the CPU): the
    256 random images above have kinks within fp32 rounding, where two exact fp32 methods that
    round differently (a checkpointed piece ends between a convolution and its BatchNorm, so it
    does not fold) differ by 1e-4 (probe_cuda_layout_accuracy.py)."""
    torch.manual_seed(2)
    net = build_model("c1", num_classes=10, in_channels=3, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    net.train()
    net(x)
    net, x, y = net.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    assert relu_margin(net, x, bn_mode) > 1e-6  # 2.8e-6 on the CPU
    v = [torch.randn_like(p) for p in net.parameters()]
    ref = hvp(
        net, cross_entropy_loss, (x, y), v, method="double_backward", custom_rules=False, bn_mode=bn_mode
    )
    for rules in (False, True):
        got = hvp(net, cross_entropy_loss, (x, y), v, checkpoint=True, custom_rules=rules, bn_mode=bn_mode)
        assert rel(got, ref) < 1e-5, rules
    got = hvp(net, cross_entropy_loss, (x, y), v, custom_rules=True, bn_mode=bn_mode)  # fold and layout
    assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("rules", [True, False], ids=["our_rules", "pytorch_rules"])
def test_bf16_eigenvalue_within_2_percent_of_fp32(exact_fp32, rules):
    model, batch = cnn_and_batch(128)
    kw = {"max_iter": 10, "tol": 0.0, "seed": 0, "custom_rules": rules}
    fp32 = top_eigenvalue(model, cross_entropy_loss, [batch], **kw)
    bf16 = top_eigenvalue(model, cross_entropy_loss, [batch], autocast_dtype=torch.bfloat16, **kw)
    assert fp32.finite and bf16.finite
    assert abs(bf16.eigenvalue / fp32.eigenvalue - 1) < 0.02


def test_bf16_training_run_with_checks(tmp_path):
    cfg = load_config(
        None,
        {
            "model": "cnn",
            "limit_train_samples": 2048,
            "epochs": 1,
            "batch_size": 64,
            "max_batch_size": 256,
            "micro_batch_size": 128,
            "hessian_every": 512,
            "hessian_samples": 256,
            "kappa": 1,
            "mixed_precision": "bf16",
            "progress": False,
            "tensorboard": False,
            "output_dir": str(tmp_path / "run"),
            "data_dir": os.environ.get("FMNIST_DIR", ""),  # a GPU machine may keep the data elsewhere
        },
    )
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if r["kind"] == "check"]
    assert len(checks) == summary["curvature_checks"] >= 3
    assert all(c["finite"] and c["eigenvalue"] > 0 for c in checks)
    assert {c["precision"] for c in checks} == {"bf16"}  # hessian_precision=auto: as training
    assert summary["max_batch_size"] > 64  # kappa = 1: every check without a drop grows the batch
