"""Op tests run with torch's uninitialized memory filled with NaN (as flash-linear-attention pre-fills its
outputs): a kernel that leaves an element of an ``empty`` output unwritten fails its comparison."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _nan_filled_empty():
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)  # filling needs the deterministic mode
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = was_filling
