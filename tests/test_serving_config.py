"""The shipped Serve configs are valid for Ray Serve and for the app's own arguments."""

from pathlib import Path

import pytest
import yaml

from ray_app.serving import AppArgs

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/serve_local.yaml"])
def test_config_validates(path):
    serve_schema = pytest.importorskip("ray.serve.schema")
    config = yaml.safe_load((REPO / path).read_text())
    serve_schema.ServeDeploySchema(**config)
    for app in config["applications"]:
        assert app["import_path"] == "ray_app.serving:build_app"
        AppArgs(**app["args"])
        names = {d["name"] for d in app.get("deployments", [])}
        assert names <= {"Gateway", "LabellerDeployment", "MriDeployment"}, names


def test_unknown_app_argument_is_refused():
    with pytest.raises(Exception, match="conditions"):
        AppArgs(engine={})
