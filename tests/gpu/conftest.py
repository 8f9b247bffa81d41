"""The GPU tests: correctness of the CUDA paths (the speed half is ``bench/gpu_check.py``).

Every test here is marked ``cuda`` (``pytestmark`` in each module); ``tests/conftest.py`` skips them,
with the reason, where ``torch.cuda.is_available()`` is False. Run them with
``python -m pytest tests/gpu -m cuda``. The shared cases live in ``bench/gpu_cases.py``.
"""

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_cuda_state():
    """Each test gives back the GPU memory it cached, so that the large cases do not add up."""
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
