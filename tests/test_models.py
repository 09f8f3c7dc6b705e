"""Every zoo model builds and trains one step at its data set's shape; the normalising wrapper."""

import pytest
import torch

from scaling_abs.errors import UserError
from scaling_abs.models import MODELS, Normalized, build_model, count_parameters, model_default_augmentation

# (classes, channels, size): the data set each model is for, at a small but valid size
SHAPES = {
    "mlp": (10, 1, 28),
    "cnn": (10, 1, 28),
    "vit_tiny": (10, 1, 28),
    "s1": (10, 3, 32),
    "c1": (10, 3, 32),
    "c2": (10, 3, 32),
    "c3": (10, 3, 32),
    "c4": (100, 3, 32),
    "i1": (200, 3, 64),
    "i2": (1000, 3, 64),
    "i3": (1000, 3, 64),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_forward_backward(name):
    classes, channels, size = SHAPES[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, in_channels=channels, image_size=size)
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, classes)
    out.float().logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert count_parameters(model) > 0


def test_paper_ids_and_augmentation():
    assert {MODELS[k].paper_id for k in ("s1", "c1", "c2", "c3", "c4", "i1", "i2", "i3")} == {
        "S1",
        "C1",
        "C2",
        "C3",
        "C4",
        "I1",
        "I2",
        "I3",
    }
    assert [model_default_augmentation(m) for m in ("s1", "c1", "c2", "c3", "c4", "i1", "i2", "i3")] == [
        "none",
        "none",
        "none",
        "crop_flip",
        "crop_flip",
        "crop_flip",
        "resized_crop_flip",
        "resized_crop_flip",
    ]


def test_normalized_wrapper_math():
    inner = torch.nn.Identity()
    model = Normalized(inner, mean=(0.5, 0.25), std=(0.5, 0.25))
    x = torch.ones(1, 2, 1, 1)
    torch.testing.assert_close(model(x), torch.tensor([[[[1.0]], [[3.0]]]]))
    assert Normalized(inner)(x) is x
    assert "mean" not in model.state_dict()  # constants, not weights


def test_unknown_and_unavailable_models():
    with pytest.raises(UserError, match="model"):
        build_model("resnet1000", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(UserError, match="hf:"):
        build_model("hf:/no/such/model", num_classes=10, in_channels=3, image_size=32)


def test_hf_checkpoint_loads_in_fp32_with_its_processor_s_normalisation(tmp_path, save_tiny_vit, monkeypatch):
    """An fp16 checkpoint trained fp16 weights with plain SGD, and the model's image processor
    (the normalisation its weights expect) was ignored for the data set's statistics."""
    transformers = save_tiny_vit(tmp_path / "vit", 3, torch.float16)
    model = build_model(
        f"hf:{tmp_path / 'vit'}", num_classes=3, in_channels=3, image_size=8, mean=[0.1] * 3, std=[0.2] * 3
    )
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.mean.flatten().tolist() == pytest.approx([0.1] * 3)  # no processor: the data set's
    transformers.ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        tmp_path / "vit"
    )
    model = build_model(
        f"hf:{tmp_path / 'vit'}", num_classes=3, in_channels=3, image_size=8, mean=[0.1] * 3, std=[0.2] * 3
    )
    assert model.mean.flatten().tolist() == pytest.approx([0.5] * 3)
    assert model.std.flatten().tolist() == pytest.approx([0.25] * 3)
    monkeypatch.setenv("HOME", str(tmp_path))  # hf:~/vit: the same model, its processor too
    model = build_model("hf:~/vit", num_classes=3, in_channels=3, image_size=8)
    assert model.mean.flatten().tolist() == pytest.approx([0.5] * 3)
    with pytest.raises(UserError, match=r"^model: hf:/no/such/vit: no such directory$"):
        build_model("hf:/no/such/vit", num_classes=3, in_channels=3, image_size=8)


def test_normalized_feeds_half_precision_weights_their_dtype():
    """DeepSpeed's bf16 keeps the weights in bf16 without autocast: fp32 inputs met bf16 weights at
    the first layer. The input follows the weights after the normalisation, and its gradient (FGSM's)
    comes back in fp32; the checkpointed chain's first unit does the same."""
    from scaling_abs._segmented import _Normalize

    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=28, mean=[0.3], std=[0.4])
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    reference = model(x)
    model.to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
    assert _Normalize(model)(x).dtype == torch.bfloat16
    model.float()
    assert model.normalize(x).dtype == torch.float32  # fp32 weights: no cast (autocast's business)
