import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on by default
sys.path.insert(0, str(Path(__file__).parent))

from cluster_sim import tests_on_path  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from ray_app.engines import EngineConfig, make_engine

    return make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=4, max_new_tokens=12))


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for a test module (`pytest.mark.usefixtures("ray_cluster")`). tests/ is on
    the workers' path so that an engine class defined in a test module (such as
    'test_label_job:FailingEngine') can be imported inside the actors."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join(p for p in (*tests_on_path(), str(tests.parent), os.environ.get("PYTHONPATH"))
                           if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


# The suite's verdict, kept for the exit below.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter finalisation once the verdict is printed. The suite starts
    Ray, Ray Serve, Ray Train (gloo) and torch thread pools in this process; tearing their
    native threads down at interpreter exit crashed once in CI with a segmentation fault
    *after* '429 passed', turning a green run red. The exit status is pytest's own."""
    if _EXIT_STATUS and os.environ.get("RAY_APP_TEST_HARD_EXIT", "1") == "1":
        ray = sys.modules.get("ray")  # only when a test used it (the vLLM venv has no Ray)
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with the test bucket (tests/s3_server.py)."""
    from s3_server import s3_server

    with s3_server() as endpoint:
        yield endpoint
