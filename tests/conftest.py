import os

import pytest
import torch

# Keep the pytest process single-threaded, as every rank is: fast on 2 cores, and fork-safe.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: runs wherever a GPU is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
