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
