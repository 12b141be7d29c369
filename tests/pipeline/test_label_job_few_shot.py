"""The labelling job with `few_shot: auto` conditions and an example pool (--few-shot-pool,
--few-shot-truth): dry-run engine on a local Ray cluster."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from ray_app.engines import EngineConfig, make_engine
from ray_app.labelling.conditions import load_condition
from ray_app.labelling.few_shot import MANIFEST_KEY, FewShotError, bind_pool, load_pool
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.label_job import LabelJobConfig, ResumeError, run_label_job

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
from label_reports import build_config, parse_args  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

SAMPLES = REPO / "ray_app" / "labelling" / "sample_data"


@pytest.fixture()
def setup(tmp_path):
    """Sample spine reports split into a pool (with its labels) and reports to label."""
    reports = pd.read_csv(SAMPLES / "spine_reports.csv", dtype=str)[["report_id", "text"]]
    truth = pd.read_csv(SAMPLES / "spine_answers.csv", dtype={"level": str},
                        keep_default_na=False)
    pool_ids = sorted(reports["report_id"])[:12]
    reports.to_csv(tmp_path / "reports.csv", index=False)
    truth[truth["report_id"].isin(pool_ids)].to_csv(tmp_path / "pool_truth.csv", index=False)
    reports[~reports["report_id"].isin(pool_ids)].head(8).to_csv(tmp_path / "to_label.csv",
                                                                 index=False)
    spec = tmp_path / "cancer_auto.yaml"
    spec.write_text("name: spinal_cancer\ndefinition: Spinal cancer is any malignant tumour of "
                    "the spine.\ndrop_sections: [history]\nfew_shot: auto\nfew_shot_k: 2\n")
    cfg = LabelJobConfig(input=str(tmp_path / "to_label.csv"), output=str(tmp_path / "out"),
                         conditions=[str(spec), "disc_herniation"],
                         engine=EngineConfig(engine="dry-run", model="m"), reports_per_batch=3,
                         few_shot_pool=str(tmp_path / "reports.csv"),
                         few_shot_truth=str(tmp_path / "pool_truth.csv"))
    return cfg, pool_ids


@pytest.mark.timeout(240)
def test_job_with_a_pool_records_it_and_refuses_another(setup, tmp_path):
    cfg, pool_ids = setup
    summary = run_label_job(cfg)
    assert summary.reports_labelled == 8 and summary.error_rows == 0
    labels = tables.read_finished(tables.locate(cfg.output).child("labels"), None)
    pool = load_pool(cfg.few_shot_pool, cfg.few_shot_truth)
    cancer, herniation = bind_pool([load_condition(cfg.conditions[0]),
                                    load_condition("disc_herniation")], pool)
    assert herniation == load_condition("disc_herniation")  # not auto: left as it is
    hashes = labels.groupby("condition")["definition_hash"].unique().to_dict()
    assert list(hashes["spinal_cancer"]) == [cancer.definition_hash()]
    assert cancer.few_shot_pool == pool.identity("spinal_cancer")
    assert list(hashes["disc_herniation"]) == [herniation.definition_hash()]
    # The actors showed the examples the pool picks here (dry-run scores hash the prompt).
    texts = pd.read_csv(cfg.input, dtype=str)
    expected = Labeller(make_engine(cfg.engine), [load_condition(cfg.conditions[0])],
                        few_shot_pool=pool).label(
        [ReportTask(i, t) for i, t in zip(texts["report_id"], texts["text"])])
    got = labels[labels["condition"] == "spinal_cancer"].set_index("report_id")["score"]
    assert {r["report_id"]: r["score"] for r in expected} == got.to_dict()
    manifest = json.loads((Path(cfg.output) / "manifest.json").read_text())
    assert set(manifest[MANIFEST_KEY]) == {"spinal_cancer"}
    assert manifest[MANIFEST_KEY]["spinal_cancer"]["report_ids"] == pool_ids
    assert manifest["conditions"]["spinal_cancer"] == cancer.definition_hash()

    # The same pool again: nothing to do. Another pool: refused, nothing written.
    assert run_label_job(cfg).label_rows == 0
    smaller = tmp_path / "smaller_truth.csv"
    truth = pd.read_csv(cfg.few_shot_truth, dtype={"level": str}, keep_default_na=False)
    truth[truth["report_id"] != pool_ids[0]].to_csv(smaller, index=False)
    with pytest.raises(ResumeError, match="few-shot example pool of spinal_cancer"):
        run_label_job(dataclasses.replace(cfg, few_shot_truth=str(smaller)))
    # Adding a condition without the pool keeps the record of the pool's examples.
    more = dataclasses.replace(cfg, conditions=["cauda_equina_compression"], few_shot_pool=None,
                               few_shot_truth=None)
    assert run_label_job(more).label_rows == 8
    manifest = json.loads((Path(cfg.output) / "manifest.json").read_text())
    assert manifest[MANIFEST_KEY]["spinal_cancer"]["report_ids"] == pool_ids
    assert len(tables.read_finished(tables.locate(cfg.output).child("labels"), None)) == 8 * 3


@pytest.mark.timeout(120)
def test_auto_without_a_pool_is_refused_before_anything_is_written(setup):
    cfg, _ = setup
    with pytest.raises(FewShotError, match=r"\['spinal_cancer'\] ask for 'few_shot: auto'"):
        run_label_job(dataclasses.replace(cfg, few_shot_truth=None))
    assert not Path(cfg.output).exists()
    with pytest.raises(FewShotError, match="given but no condition asks"):
        run_label_job(dataclasses.replace(cfg, conditions=["disc_herniation"]))


def test_cli_flags(setup):
    cfg, _ = setup
    args = parse_args(["--input", cfg.input, "--output", cfg.output, "--conditions",
                       *cfg.conditions, "--few-shot-pool", cfg.few_shot_pool,
                       "--few-shot-truth", cfg.few_shot_truth, "--engine", "dry-run"])
    built = build_config(args)
    assert (built.few_shot_pool, built.few_shot_truth) == (cfg.few_shot_pool, cfg.few_shot_truth)
