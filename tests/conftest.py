import os

import pytest
import torch

if not torch.cuda.is_available():
    # Set before anything imports triton (transformers probes for it): the GPU kernels run on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Fresh random inputs drawn from a fixed seed per test: varied data, reproducible failures."""
    torch.manual_seed(1234)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the reference's scale."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# A live server for the API and load-generator tests (tests/serve, tests/bench), one per module.
@pytest.fixture(scope="module")
def engine():
    from tests.helpers import make_engine

    engine = make_engine()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def base_url(engine):
    from tests.helpers import API_KEY, live_server

    with live_server(engine, API_KEY) as url:
        yield url
