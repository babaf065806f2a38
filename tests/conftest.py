import os

import pytest
import torch

os.environ.setdefault("CI", "1")  # progress bars off
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M-Instruct and its tokenizer, loaded once (from the cache after the first time)."""
    from nanopeft.lab.models import load_base_model

    return load_base_model()


@pytest.fixture(scope="session")
def tokenizer(smollm):
    return smollm[1]


@pytest.fixture
def fresh_smollm(smollm):
    """A private copy of the bundled model, for tests that change it."""
    import copy

    return copy.deepcopy(smollm[0])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; this machine has no GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
