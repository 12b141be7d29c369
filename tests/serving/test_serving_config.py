"""The shipped Serve configs are valid for Ray Serve and for the app's own arguments."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ray_app.serving.app import AppArgs

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/serve_local.yaml"])
def test_config_validates(path):
    serve_schema = pytest.importorskip("ray.serve.schema")
    config = yaml.safe_load((REPO / path).read_text())
    serve_schema.ServeDeploySchema(**config)
    for app in config["applications"]:
        assert app["import_path"] == "ray_app.serving.app:build_app"
        AppArgs(**app["args"])
        names = {d["name"] for d in app.get("deployments", [])}
        assert names <= {"Gateway", "LabellerDeployment", "MriDeployment"}, names


def test_unknown_app_argument_is_refused():
    """A misspelt argument is refused by name instead of silently ignored; the same arguments
    spelt right are valid, so the typo alone is what fails."""
    valid = {"conditions": ["spinal_cancer"], "engine": {}, "max_batch_size": 32}
    assert AppArgs(**valid).max_batch_size == 32
    typo = {"conditions": ["spinal_cancer"], "engine": {}, "max_batch_sise": 32}
    with pytest.raises(ValidationError, match=r"max_batch_sise\s+Extra inputs are not permitted") \
            as refused:
        AppArgs(**typo)
    assert [e["loc"] for e in refused.value.errors()] == [("max_batch_sise",)]


def test_missing_conditions_are_refused():
    with pytest.raises(ValidationError, match="conditions"):
        AppArgs(engine={})
