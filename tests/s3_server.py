"""An S3 endpoint for tests: moto's server on 127.0.0.1 (loopback only), with dummy credentials."""

from __future__ import annotations

import contextlib
import os

BUCKET = "reports-bucket"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


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
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        create_backend_app,
    )
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:  # ThreadedMotoServer's, with the middleware added
            app = _result_root_fix(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    return Server(ip_address="127.0.0.1", port=0, verbose=False)


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1 with one bucket, the dummy credentials in the environment."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = _moto_server()
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    _client(endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")
