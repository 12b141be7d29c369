"""The labelling job reading from and writing to S3 (moto's server on 127.0.0.1), resumable there.

Only loopback traffic: moto serves the S3 API from a thread of this process; the Ray workers
reach it through the job's s3_endpoint and get the (dummy) credentials from the environment.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from s3_server import BUCKET, CREDENTIALS, _client

from ray_app.engines import EngineConfig
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.label_job import LabelJobConfig, run_label_job

pytestmark = pytest.mark.ray

TEXTS = [
    "FINDINGS: Moderate central canal stenosis at L4-L5 from a disc bulge.\n"
    "IMPRESSION: Moderate L4-L5 stenosis.",
    "CLINICAL HISTORY: Prostate cancer.\nFINDINGS: Sclerotic lesions in L3 and S1 in keeping "
    "with metastases.\nIMPRESSION: Osseous metastases.",
    "FINDINGS: Normal alignment and marrow signal. No stenosis.\nIMPRESSION: Normal study.",
    "FINDINGS: Right L5-S1 disc extrusion compressing the S1 root.\nIMPRESSION: L5-S1 extrusion.",
]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_endpoint):
    """Started after the credentials are in the environment; passed on explicitly too."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**CREDENTIALS, "RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


def _keys_under(endpoint: str, prefix: str) -> list[str]:
    listing = _client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.mark.timeout(300)
def test_label_job_reads_and_writes_s3_and_resumes_there(s3_endpoint):
    rows = [{"report_id": f"s3-{i:03d}", "text": TEXTS[i % len(TEXTS)]} for i in range(10)]
    rows.append({"report_id": "s3-empty", "text": "  "})
    body = pd.DataFrame(rows).to_csv(index=False).encode()
    _client(s3_endpoint).put_object(Bucket=BUCKET, Key="reports.csv", Body=body)

    cfg = LabelJobConfig(input=f"s3://{BUCKET}/reports.csv", output=f"s3://{BUCKET}/out",
                         conditions=["spinal_cancer", "spinal_canal_stenosis"],
                         engine=EngineConfig(engine="dry-run"), reports_per_batch=4,
                         s3_endpoint=s3_endpoint)
    summary = run_label_job(cfg)
    assert (summary.reports_labelled, summary.label_rows, summary.error_rows) == (10, 70, 1)

    out = tables.locate(cfg.output, s3_endpoint)
    labels = tables.read_finished(out.child("labels"), None)
    errors = tables.read_finished(out.child("errors"), None)
    keys = list(zip(labels["report_id"], labels["condition"], labels["level"].fillna("")))
    assert len(keys) == len(set(keys)) == 70
    assert set(labels["report_id"]) == {r["report_id"] for r in rows[:10]}
    assert (labels["engine"] == "dry-run").all()
    assert errors["report_id"].tolist() == ["s3-empty"]
    assert errors["reason"].tolist() == ["report text is empty"]

    written = _keys_under(s3_endpoint, "out/")
    assert "out/manifest.json" in written
    parts = [k for k in written if k.endswith(".parquet")]
    assert len([k for k in parts if k.startswith("out/labels/")]) == 3  # 11 rows, 4 per batch
    manifest = json.loads(_client(s3_endpoint).get_object(
        Bucket=BUCKET, Key="out/manifest.json")["Body"].read())
    assert set(manifest["conditions"]) == {"spinal_cancer", "spinal_canal_stenosis"}

    # Resume on S3: everything is skipped and nothing new is written.
    again = run_label_job(cfg)
    assert again.skipped_done == 20
    assert (again.reports_labelled, again.label_rows, again.error_rows) == (0, 0, 0)
    assert [k for k in _keys_under(s3_endpoint, "out/") if k.endswith(".parquet")] == parts


@pytest.mark.timeout(300)
def test_jsonl_folder_on_s3(s3_endpoint):
    client = _client(s3_endpoint)
    for n in range(2):
        lines = [json.dumps({"accession": f"j{n}-{i}", "body": TEXTS[i]}) for i in range(3)]
        client.put_object(Bucket=BUCKET, Key=f"jsonl/part-{n}.jsonl", Body="\n".join(lines).encode())
    client.put_object(Bucket=BUCKET, Key="jsonl/_SUCCESS", Body=b"")
    cfg = LabelJobConfig(input=f"s3://{BUCKET}/jsonl", input_format="json",
                         output=f"s3://{BUCKET}/out-jsonl", conditions=["spinal_cancer"],
                         engine=EngineConfig(engine="dry-run"), id_column="accession",
                         text_column="body", s3_endpoint=s3_endpoint)
    summary = run_label_job(cfg)
    labels = tables.read_finished(tables.locate(cfg.output, s3_endpoint).child("labels"), None)
    assert sorted(labels["report_id"]) == sorted(f"j{n}-{i}" for n in range(2) for i in range(3))
    assert summary.input_rows == 6 and summary.error_rows == 0
