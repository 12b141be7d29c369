"""The Ray embedding job on a few phantom studies: embeddings keyed by study/series/level, an
errors table, resumption (disc by disc, after a kill between two writes), idempotent part files,
refusal of random weights unless asked, and the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_CROP, SMALL_IMAGE_SIZE

from ray_app.imaging.dicom_store import FileError
from ray_app.imaging.embed_job import (
    EmbedActor,
    EmbedJobConfig,
    run_embed_job,
    write_errors,
)
from ray_app.imaging.embeddings import WeightsError
from ray_app.pipeline import report_tables as tables

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
    settings = dict(dicom=str(phantoms["dicom"]), locations=str(phantoms["locations"]),
                    output=str(output), allow_random_weights=True, crop_shape=SMALL_CROP,
                    image_size=SMALL_IMAGE_SIZE, batch_volumes=8, cpus_per_actor=0.5)
    return EmbedJobConfig(**{**settings, **kwargs})


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


@pytest.mark.timeout(420)
def test_a_killed_run_resumes_disc_by_disc_without_loss_or_duplicates(few_phantoms, tmp_path):
    """A study's discs spread over several part files (2 discs per batch); deleting some parts is
    a run killed between two writes. The rerun embeds exactly the lost discs: every located disc
    ends with one row. One disc cannot be cut (its slice is outside the series): its error counts
    as done and is recorded once. One study names no series ('*': the rule picks it)."""
    truth = pd.read_csv(few_phantoms["locations"], dtype=str)
    studies = sorted(truth["study_uid"].unique())
    locations = truth.copy()
    bad = locations.index[locations["study_uid"] == studies[0]][2]
    locations.loc[bad, "slice_index"] = "99"
    locations.loc[locations["study_uid"] == studies[1], "series_uid"] = "*"
    locations.to_csv(tmp_path / "locations.csv", index=False)
    cfg = job_config(few_phantoms, tmp_path / "out", batch_volumes=2,
                     locations=str(tmp_path / "locations.csv"))
    expected = sorted(disc_key(*k) for i, k in enumerate(zip(
        truth["study_uid"], truth["series_uid"], truth["level"])) if i != bad)

    first = run_embed_job(cfg)
    assert (first.studies, first.discs_embedded) == (4, 19)
    out = tables.locate(cfg.output)
    folder = tmp_path / "out" / "embeddings"
    parts = sorted(folder.glob("*.parquet"))
    assert len(parts) == 10  # 19 discs, 2 per batch
    for part in parts[::3]:  # the run "died" before these writes
        part.unlink()
    kept = embedded_keys(out)
    lost = sorted(set(expected) - set(kept))
    kept_studies, lost_studies = {k.split("|")[0] for k in kept}, {k.split("|")[0] for k in lost}
    assert kept_studies & lost_studies, "the kill must leave a study partly embedded"

    again = run_embed_job(cfg)
    rows = embedded_keys(out)
    assert sorted(rows) == expected  # no disc lost, none embedded twice
    assert again.discs_embedded == len(lost)
    assert (again.studies, again.studies_skipped_done) == (len(lost_studies), 4 - len(lost_studies))
    assert again.discs_skipped_done == 20 - len(lost)  # the uncuttable disc counts as done
    errors = tables.read_finished(out.child("errors"), None)
    disc_errors = errors[errors["reason"].str.startswith("disc ")]
    assert list(disc_errors["study_uid"]) == [studies[0]]
    assert len(errors) == 4  # 3 unusable files and the disc, each once

    third = run_embed_job(cfg)
    assert (third.studies, third.studies_skipped_done, third.discs_embedded) == (0, 4, 0)
    assert sorted(embedded_keys(out)) == expected
    assert len(tables.read_finished(out.child("errors"), None)) == 4


def disc_key(study_uid: str, series_uid: str, level: str) -> str:
    return f"{study_uid}|{series_uid}|{level}"


def embedded_keys(out) -> list[str]:
    rows = tables.read_finished(out.child("embeddings"), ["study_uid", "series_uid", "level"])
    return [disc_key(*k) for k in zip(rows["study_uid"], rows["series_uid"], rows["level"])]


def test_a_batch_written_twice_leaves_one_file(tmp_path):
    """Ray may run a batch again after its first run wrote its part: the part is named after its
    discs, so the second write replaces it (in any order of the rows); so for errors parts."""
    out = tmp_path / "out"
    cfg = EmbedJobConfig(dicom="unused", locations="unused", output=str(out), allow_random_weights=True,
                         image_size=SMALL_IMAGE_SIZE, batch_volumes=4)
    actor = EmbedActor(cfg, torch_threads=None)
    rng = np.random.default_rng(0)
    batch = {"study_uid": np.array(["s1", "s1", "s2"], dtype=object),
             "series_uid": np.array(["a", "a", "b"], dtype=object),
             "level": np.array(["L1-L2", "L2-L3", "L1-L2"], dtype=object),
             "pixels": rng.random((3, *SMALL_CROP), dtype=np.float32)}
    actor(batch)
    actor(batch)
    actor({k: v[::-1].copy() for k, v in batch.items()})
    assert len(list((out / "embeddings").glob("*.parquet"))) == 1
    assert sorted(embedded_keys(tables.locate(str(out)))) == ["s1|a|L1-L2", "s1|a|L2-L3", "s2|b|L1-L2"]
    actor({k: v[:1] for k, v in batch.items()})  # another batch: another file
    assert len(list((out / "embeddings").glob("*.parquet"))) == 2

    errors = [FileError("x.dcm", "not a DICOM file"), FileError("study s1", "disc L3-L4: gone", "s1", "a")]
    write_errors(tables.locate(str(out)), errors)
    write_errors(tables.locate(str(out)), errors[::-1])
    assert len(tables.read_finished(tables.locate(str(out)).child("errors"), None)) == 2


def test_the_job_refuses_random_weights_unless_asked(few_phantoms, tmp_path, monkeypatch):
    monkeypatch.setattr("ray_app.imaging.embeddings.default_weights_file",
                        lambda: tmp_path / "absent.pth")
    cfg = job_config(few_phantoms, tmp_path / "refused")
    cfg.allow_random_weights = False
    with pytest.raises(WeightsError, match="--allow-random-weights"):
        run_embed_job(cfg)
    assert not (tmp_path / "refused").exists()


def test_cli_flags_build_the_config():
    from ray_app.pipeline.config_cli import config_from_args, config_parser

    args = config_parser(EmbedJobConfig, "x").parse_args(
        ["--dicom", "s3://b/mri", "--locations", "l.csv", "--output", "o", "--crop-shape", "9", "64",
         "128", "--allow-random-weights", "--target-spacing-mm", "0.5"])
    cfg = config_from_args(EmbedJobConfig, args)
    assert cfg.crop_shape == (9, 64, 128) and cfg.allow_random_weights is True
    assert cfg.target_spacing_mm == 0.5 and cfg.weights is None and cfg.image_size == 224
    only_dicom = config_parser(EmbedJobConfig, "x").parse_args(["--dicom", "d"])
    with pytest.raises(SystemExit):
        config_from_args(EmbedJobConfig, only_dicom)
