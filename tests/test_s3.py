"""The labelling job reading from and writing to S3 (moto's server on 127.0.0.1), resumable there.

Only loopback traffic: moto serves the S3 API from a thread of this process; the Ray workers
reach it through the job's s3_endpoint and get the (dummy) credentials from the environment.
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from ray_app import report_tables as tables
from ray_app.engines import EngineConfig
from ray_app.label_job import LabelJobConfig, run_label_job

pytestmark = pytest.mark.ray

BUCKET = "reports-bucket"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
TEXTS = [
    "FINDINGS: Moderate central canal stenosis at L4-L5 from a disc bulge.\n"
    "IMPRESSION: Moderate L4-L5 stenosis.",
    "CLINICAL HISTORY: Prostate cancer.\nFINDINGS: Sclerotic lesions in L3 and S1 in keeping "
    "with metastases.\nIMPRESSION: Osseous metastases.",
    "FINDINGS: Normal alignment and marrow signal. No stenosis.\nIMPRESSION: Normal study.",
    "FINDINGS: Right L5-S1 disc extrusion compressing the S1 root.\nIMPRESSION: L5-S1 extrusion.",
]


def _result_root_fix(app):
    """WSGI middleware for a moto 5.2 bug: its CompleteMultipartUpload answer has the root
    element <CompleteMultipartUploadResponse> where S3 (and MinIO) send
    <CompleteMultipartUploadResult>. Recent AWS C++ SDKs (pyarrow 26) take the unknown root for
    an error embedded in a 200 response, so every Parquet upload would fail against moto."""

    def wrapped(environ, start_response):
        if not (environ["REQUEST_METHOD"] == "POST" and "uploadId" in environ.get("QUERY_STRING", "")):
            return app(environ, start_response)
        captured = {}

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers, exc_info=exc_info)

        body = b"".join(app(environ, capture)).replace(
            b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
        headers = [(k, str(len(body)) if k.lower() == "content-length" else v)
                   for k, v in captured["headers"]]
        start_response(captured["status"], headers, captured["exc_info"])
        return [body]

    return wrapped


def _moto_server():
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:  # ThreadedMotoServer's, with the middleware added
            app = _result_root_fix(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    return Server(ip_address="127.0.0.1", port=0, verbose=False)


@pytest.fixture(scope="module")
def s3_endpoint():
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = _moto_server()
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    _client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


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
