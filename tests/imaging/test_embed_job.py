"""The Ray embedding job on a few phantom studies: embeddings keyed by study/series/level, an
errors table, resumption, refusal of random weights unless asked, and the CLI."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import SMALL_CROP, SMALL_IMAGE_SIZE

from ray_app import report_tables as tables
from ray_app.imaging.embed_job import EmbedJobConfig, run_embed_job
from ray_app.imaging.embeddings import WeightsError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


def job_config(phantoms, output, **kwargs) -> EmbedJobConfig:
    return EmbedJobConfig(dicom=str(phantoms["dicom"]), locations=str(phantoms["locations"]),
                          output=str(output), allow_random_weights=True, crop_shape=SMALL_CROP,
                          image_size=SMALL_IMAGE_SIZE, batch_volumes=8, cpus_per_actor=0.5, **kwargs)


@pytest.mark.timeout(300)
def test_embed_job_writes_keyed_embeddings_and_errors_then_resumes(few_phantoms, tmp_path):
    cfg = job_config(few_phantoms, tmp_path / "out")
    summary = run_embed_job(cfg)
    assert (summary.studies, summary.discs_embedded) == (4, 20)
    out = tables.locate(cfg.output)
    rows = tables.read_finished(out.child("embeddings"), None)
    truth = pd.read_csv(few_phantoms["locations"], dtype=str)
    assert sorted(zip(rows["study_uid"], rows["series_uid"], rows["level"])) == sorted(
        zip(truth["study_uid"], truth["series_uid"], truth["level"]))
    assert rows["embedding"].map(len).eq(512).all()
    assert rows["weights_id"].eq("random-resnet18(seed=0)").all()
    errors = tables.read_finished(out.child("errors"), None)
    reasons = sorted(r.split(" (")[0].split(":")[0] for r in errors["reason"])
    assert reasons == ["not a DICOM file", "not an image", "pixel data cannot be decoded"]

    again = run_embed_job(cfg)
    assert (again.studies, again.studies_skipped_done, again.discs_embedded) == (0, 4, 0)
    assert len(tables.read_finished(out.child("errors"), None)) == 3  # not reported twice

    with pytest.raises(ValueError, match="holds embeddings made with"):
        run_embed_job(job_config(few_phantoms, tmp_path / "out", target_spacing_mm=1.0))


def test_the_job_refuses_random_weights_unless_asked(few_phantoms, tmp_path, monkeypatch):
    monkeypatch.setattr("ray_app.imaging.embeddings.default_weights_file",
                        lambda: tmp_path / "absent.pth")
    cfg = job_config(few_phantoms, tmp_path / "refused")
    cfg.allow_random_weights = False
    with pytest.raises(WeightsError, match="--allow-random-weights"):
        run_embed_job(cfg)
    assert not (tmp_path / "refused").exists()


def test_cli_flags_build_the_config():
    from ray_app.imaging.job_flags import config_from_args, parser_for

    args = parser_for(EmbedJobConfig, "x").parse_args(
        ["--dicom", "s3://b/mri", "--locations", "l.csv", "--output", "o", "--crop-shape", "9", "64",
         "128", "--allow-random-weights", "--target-spacing-mm", "0.5"])
    cfg = config_from_args(EmbedJobConfig, args)
    assert cfg.crop_shape == (9, 64, 128) and cfg.allow_random_weights is True
    assert cfg.target_spacing_mm == 0.5 and cfg.weights is None and cfg.image_size == 224
    with pytest.raises(SystemExit):
        parser_for(EmbedJobConfig, "x").parse_args(["--dicom", "d"])
