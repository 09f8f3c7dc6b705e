"""Model builders. Each takes ``num_classes, in_channels, image_size`` and returns a module that
maps ``(B, C, H, W)`` inputs to ``(B, num_classes)`` logits. torchvision's implementations are used
where they exist (ResNet-18/50, AlexNet); the CIFAR variants swap the 7x7 stride-2 stem and the
max-pool for a 3x3 stride-1 stem, as in the papers' CIFAR code."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from scaling_abs.errors import UserError


def mlp(*, num_classes: int, in_channels: int, image_size: int, width: int = 128) -> nn.Module:
    """Two tanh hidden layers, no batch statistics: exact equivalence tests need that."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, num_classes),
    )


def small_cnn(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The embedded default: cheap enough for CPU, ~91% on Fashion-MNIST in a few epochs."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * side * side, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


def alexnet_like(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ARG001
    """S1: the AlexNet-like model of Yao et al. (2018) (C1 there): two 5x5 conv + pool, fc 384, 192."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 5, padding=2),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 64, 5, padding=2),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
        nn.AdaptiveAvgPool2d(8),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 384),
        nn.ReLU(inplace=True),
        nn.Linear(384, 192),
        nn.ReLU(inplace=True),
        nn.Linear(192, num_classes),
    )


def _small_stem(net: nn.Module, in_channels: int) -> nn.Module:
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


def resnet18_cifar(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ARG001
    """C1 / C4: torchvision ResNet-18 with the CIFAR stem (3x3 stride 1, no max-pool)."""
    return _small_stem(torchvision.models.resnet18(num_classes=num_classes), in_channels)


def resnet50_tiny(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ARG001
    """I1: torchvision ResNet-50 with a 3x3 stride-1 stem for 64x64 TinyImageNet."""
    return _small_stem(torchvision.models.resnet50(num_classes=num_classes), in_channels)


def resnet18(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ARG001
    """I3: torchvision ResNet-18 (ImageNet stem)."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net


def alexnet(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ARG001
    """I2: torchvision AlexNet (its adaptive pool accepts 64x64 and up)."""
    net = torchvision.models.alexnet(num_classes=num_classes)
    if in_channels != 3:
        net.features[0] = nn.Conv2d(in_channels, 64, 11, 4, 2)
    return net


class _WideBasic(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


def wide_resnet_16_4(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ARG001
    """C2: WRN-16-4, (16 - 4) / 6 = 2 blocks per group, widths 64, 128, 256."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
    cin = 16
    for width, stride in ((64, 1), (128, 2), (256, 2)):
        for i in range(2):
            layers.append(_WideBasic(cin, width, stride if i == 0 else 1))
            cin = width
    layers += [
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, num_classes),
    ]
    return nn.Sequential(*layers)


def _conv_bn(cin: int, cout: int, kernel, stride: int = 1, padding=0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _SqNxtBlock(nn.Module):
    """SqueezeNext block (Gholami et al. 2018): 1x1 C/2, 1x1 C/4, 3x1 C/2, 1x3 C/2, 1x1 C."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        r = 0.5 if stride == 2 else (1.0 if cin > cout else 0.5)
        mid = int(cin * r)
        self.body = nn.Sequential(
            _conv_bn(cin, mid, 1, stride),
            _conv_bn(mid, mid // 2, 1),
            _conv_bn(mid // 2, mid, (3, 1), padding=(1, 0)),
            _conv_bn(mid, mid, (1, 3), padding=(0, 1)),
            _conv_bn(mid, cout, 1),
        )
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else _conv_bn(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def squeezenext(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ARG001
    """C3: 1.0-SqNxt-23 for 32x32 inputs: stem 3x3 64, blocks [6, 6, 8, 1] of widths 32-256, 1x1 128."""
    layers: list[nn.Module] = [_conv_bn(in_channels, 64, 3, 1, 1)]
    cin = 64
    for width, depth, stride in ((32, 6, 1), (64, 6, 2), (128, 8, 2), (256, 1, 2)):
        for i in range(depth):
            layers.append(_SqNxtBlock(cin, width, stride if i == 0 else 1))
            cin = width
    layers += [_conv_bn(cin, 128, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


class _LogitsOnly(nn.Module):
    """A transformers image classifier as ``x -> logits``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def vit_tiny(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A small ViT from a ``ViTConfig`` (no download); SDPA attention (the HVP forces its math backend)."""
    from transformers import ViTConfig, ViTForImageClassification

    patch = 4 if image_size % 4 == 0 else 2
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch,
        num_channels=in_channels,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=num_classes,
        attn_implementation="sdpa",
    )
    return _LogitsOnly(ViTForImageClassification(config))


def hf_path(path: str) -> str:
    """``hf:``'s name or path as transformers takes it: ``~`` expanded (transformers does not)."""
    return os.path.expanduser(path)


def hf_pretrained(path: str, *, num_classes: int) -> nn.Module:
    """``hf:<name or local path>``: pretrained weights that are already on disk (no hub access),
    in fp32 whatever the checkpoint stores (an fp16 checkpoint trained fp16 weights with plain
    SGD; mixed precision is ``mixed_precision``'s)."""
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise UserError("model: hf: models need transformers (pip install 'scaling-abs[hf]')") from None
    if path.startswith((".", "/", "~")) and not Path(hf_path(path)).is_dir():
        raise UserError(f"model: hf:{path}: no such directory")
    try:
        net = AutoModelForImageClassification.from_pretrained(
            hf_path(path),
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
            local_files_only=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"model: cannot load hf:{path} from local files ({str(e).splitlines()[0]})") from None
    return _LogitsOnly(net)


def hf_normalization(path: str) -> tuple[list[float], list[float]] | None:
    """The mean and std of the model's own image processor (``preprocessor_config.json``), which
    its pretrained weights expect; None without one, or one that does not normalise."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(hf_path(path), local_files_only=True)
    except Exception:  # no processor saved with the model: the data set's statistics apply
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if not getattr(processor, "do_normalize", True) or mean is None or std is None:
        return None
    return list(mean), list(std)
