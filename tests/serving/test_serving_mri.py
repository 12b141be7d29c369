"""POST /v1/mri/predict over real HTTP on 127.0.0.1 (ray_app/serving/app.py): a phantom study as
uploaded files and as a storage URI, malformed DICOM, and URIs outside the storage roots."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

PORT = 18124
BASE = f"http://127.0.0.1:{PORT}"


def tiny_classifier(folder: Path) -> str:
    """A disc SVM on random 512-d features: this module tests the HTTP plumbing; the imaging
    tests judge the classifiers."""
    from ray_app.imaging.classifiers import DiscSVM, TrainedClassifier
    from ray_app.imaging.embeddings import EmbeddingSettings

    rng = np.random.default_rng(0)
    model = DiscSVM().fit(rng.normal(size=(40, 512)), np.arange(40) % 2)
    settings = EmbeddingSettings("random-resnet18(seed=0)", image_size=32)
    TrainedClassifier(model, "spinal_canal_stenosis", 0.0,
                      embedding_settings=settings.to_dict()).save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from ray_app.imaging.phantoms import PhantomConfig, make_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    paths = make_phantom_dataset(root, PhantomConfig(studies=2, clean=True))
    locations = pd.read_csv(paths["locations"])
    folder = sorted(p for p in paths["dicom"].iterdir() if p.is_dir())[0]
    return root, folder, locations


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir, study, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from ray_app.serving.app import build_app

    root, _, _ = study
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    classifier = tiny_classifier(tmp_path_factory.mktemp("clf") / "stenosis")
    serve.run(build_app({"conditions": ["spinal_canal_stenosis"], "allow_uncalibrated": True,
                         "engine": {"model": str(tiny_model_dir)},
                         "mri_classifiers": [classifier], "storage_roots": [str(root)],
                         "max_upload_bytes": 20_000_000}), name="mri", route_prefix="/")
    yield BASE
    serve.shutdown()
    ray.shutdown()


def predict(files=None, data=None):
    import requests

    response = requests.post(f"{BASE}/v1/mri/predict", files=files, data=data, timeout=300)
    return response.status_code, response.json()


def study_files(folder: Path) -> list:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(folder.iterdir())]


def test_upload_round_trip(endpoint, study):
    _, folder, locations = study
    status, body = predict(study_files(folder), {"locations": locations.to_csv(index=False)})
    assert status == 200, body
    (prediction,) = body["predictions"]
    assert prediction["condition"] == "spinal_canal_stenosis" and prediction["kind"] == "disc"
    levels = [d["level"] for d in prediction["discs"]]
    assert levels == sorted(set(locations[locations["study_uid"] == body["study_uid"]]["level"]))
    assert prediction["scan"]["score"] == max(d["score"] for d in prediction["discs"])


def test_uri_under_a_root_and_outside_it(endpoint, study, tmp_path):
    _, folder, locations = study
    records = locations.to_json(orient="records")
    status, body = predict(data={"uri": str(folder), "locations": records})
    assert status == 200, body
    status, body = predict(data={"uri": str(folder / ".." / ".." / ".."), "locations": records})
    assert status == 403 and "outside the allowed storage roots" in body["detail"]


def test_malformed_dicom_is_400(endpoint, study):
    _, _, locations = study
    files = [("files", ("junk.dcm", b"\x00" * 200 + b"not a dicom file", "application/dicom"))]
    status, body = predict(files, {"locations": locations.to_csv(index=False)})
    assert status == 400 and "study" in body["detail"], body


@pytest.mark.parametrize("data, status, message", [
    ({"locations": '[{"study_uid": "1"}]'}, 422, "either DICOM files or a storage uri"),
    ({"locations": "[]", "uri": "/x"}, 400, "non-empty list"),
    ({"locations": "{broken", "uri": "/x"}, 400, "locations"),
])
def test_bad_requests(endpoint, data, status, message):
    code, body = predict(data=data)
    assert code == status and message in body["detail"], body
