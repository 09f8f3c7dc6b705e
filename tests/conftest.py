import os

import pytest
import torch

# 2-core CI machine: one thread per test process keeps the suite predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_collection_modifyitems(config, items):
    # SCALING_ABS_TEST_DEVICE=cpu runs the gpu-marked tests on the CPU: a check of the tests
    # themselves on machines without a GPU (tests/test_gpu.py).
    if torch.cuda.is_available() or os.environ.get("SCALING_ABS_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def save_tiny_vit():
    """``save(path, num_labels, dtype=torch.float32)``: a 1-layer ViT for 3x8x8 images, saved with
    ``save_pretrained`` (transformers needed: the test is skipped without it)."""
    transformers = pytest.importorskip("transformers")

    def save(path, num_labels: int, dtype=None):
        config = transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=num_labels,
        )
        net = transformers.ViTForImageClassification(config)
        (net if dtype is None else net.to(dtype)).save_pretrained(path)
        return transformers

    return save
