import os

import pytest
import torch

os.environ.setdefault("NANOPEFT_PROGRESS", "0")  # progress bars off
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub


@pytest.fixture(scope="session")
def first_load():
    """The session's first load of the bundled model: (model, tokenizer, seconds, built). built: the cache was absent
    (a fresh clone, as in CI), so this load converted the GGUF file and wrote the cache every later load reads."""
    import time

    from nanopeft.lab import models

    built = not (models.cache_dir() / models.BUNDLED / "nanopeft_cache.json").is_file()
    start = time.perf_counter()
    model, tokenizer = models.load_base_model()
    return model, tokenizer, time.perf_counter() - start, built


@pytest.fixture(scope="session")
def smollm(first_load):
    """The bundled SmolLM2-135M-Instruct and its tokenizer, loaded once (from the cache after the first time)."""
    return first_load[:2]


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
