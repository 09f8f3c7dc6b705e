"""The model zoo: the paper's models (Appendix B), small ones for tests and the default, and
Hugging Face transformers models.

Inputs are always in [0, 1]; per-channel normalisation lives in :class:`Normalized` so FGSM's
``eps`` and ``bounds`` keep the paper's meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from scaling_abs.errors import UserError
from scaling_abs.models import vision


@dataclass(frozen=True)
class ModelInfo:
    paper_id: str
    description: str
    dataset: str
    augmentation: str
    build: Callable[..., nn.Module]


MODELS: dict[str, ModelInfo] = {
    "mlp": ModelInfo(
        "-", "MLP 2x128 tanh, no batch statistics (tests, equivalences)", "fashion_mnist", "none", vision.mlp
    ),
    "cnn": ModelInfo(
        "-", "small CNN (2 conv + BN, 2 fc): the embedded default", "fashion_mnist", "none", vision.small_cnn
    ),
    "s1": ModelInfo("S1", "AlexNet-like (Yao et al. 2018, C1)", "svhn_extra", "none", vision.alexnet_like),
    "c1": ModelInfo("C1", "ResNet-18, CIFAR variant", "cifar10", "none", vision.resnet18_cifar),
    "c2": ModelInfo("C2", "Wide-ResNet 16-4", "cifar10", "none", vision.wide_resnet_16_4),
    "c3": ModelInfo("C3", "SqueezeNext 1.0-23, CIFAR variant", "cifar10", "crop_flip", vision.squeezenext),
    "c4": ModelInfo("C4", "ResNet-18, CIFAR variant", "cifar100", "crop_flip", vision.resnet18_cifar),
    "i1": ModelInfo(
        "I1", "ResNet-50 (torchvision), 64x64 stem", "tinyimagenet", "crop_flip", vision.resnet50_tiny
    ),
    "i2": ModelInfo("I2", "AlexNet (torchvision)", "imagenet", "resized_crop_flip", vision.alexnet),
    "i3": ModelInfo("I3", "ResNet-18 (torchvision)", "imagenet", "resized_crop_flip", vision.resnet18),
    "vit_tiny": ModelInfo(
        "-",
        "ViT (transformers, from a config: 64 wide, 2 layers, 2 heads, patch 4)",
        "fashion_mnist",
        "none",
        vision.vit_tiny,
    ),
}


class Normalized(nn.Module):
    """``model((x - mean) / std)``: data stays in [0, 1], the model sees normalised inputs."""

    def __init__(
        self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ):
        super().__init__()
        self.model = model
        c = len(mean) if mean is not None else 0
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1) if c else None, persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1) if c else None, persistent=False
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std``, in the wrapped model's dtype where that is bf16/fp16: DeepSpeed's
        bf16/fp16 keeps the weights in half precision without autocast, so the inputs follow them
        here (as transformers' Trainer casts them), after the data and FGSM's perturbation, which
        stay fp32. Checkpointed products call it as their first unit."""
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        p = next(self.model.parameters(), None)
        if p is not None and p.dtype in (torch.bfloat16, torch.float16) and x.dtype == torch.float32:
            x = x.to(p.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """A zoo model (or ``hf:<name or local path>``) wrapped in :class:`Normalized`: with the data
    set's ``mean``/``std``, or for an ``hf:`` model with an image processor, the processor's (what
    its pretrained weights expect)."""
    if name.startswith("hf:"):
        net = vision.hf_pretrained(name[3:], num_classes=num_classes)
        mean, std = vision.hf_normalization(name[3:]) or (mean, std)
    elif name in MODELS:
        net = MODELS[name].build(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    else:
        raise UserError(f"model: unknown model {name!r} (choose {', '.join(sorted(MODELS))} or hf:<name>)")
    return Normalized(net, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_default_augmentation(name: str) -> str:
    """The paper's augmentation for the model: none for S1/C1/C2, crop + flip for C3/C4/I1,
    RandomResizedCrop + flip for I2/I3."""
    return MODELS[name].augmentation if name in MODELS else "none"
