import logging
import os

import pytest
import torch

# under pytest-xdist each worker gets its share of the cores
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
logging.getLogger("ts_qat_pytorch").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
