"""Checks on what an endpoint is sent: bearer tokens, sizes, and storage URIs confined to
configured roots. Plain Python (no Ray, no FastAPI) so each rule is tested on its own; the Serve
app turns RequestRejected into an HTTP answer with its status and message."""

from __future__ import annotations

import hmac
import os
import posixpath


class RequestRejected(Exception):
    """A request the service will not serve: `status` is the HTTP status, the message its reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_bearer(header: str | None, expected: str | None) -> None:
    """No token configured: anyone may call. Otherwise `Authorization: Bearer <token>` must
    match, compared in constant time so the token cannot be guessed byte by byte."""
    if expected is None:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RequestRejected(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise RequestRejected(401, "invalid bearer token")


def check_size(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise RequestRejected(413, f"{what} is {size:,} bytes; the limit is {limit:,}")


def check_report(text: str, max_chars: int) -> None:
    if not text.strip():
        raise RequestRejected(422, "the report is empty")
    if len(text) > max_chars:
        raise RequestRejected(413, f"the report has {len(text):,} characters; the limit is "
                                   f"{max_chars:,} (split it or raise max_report_chars)")


def allowed_uri(uri: str, roots: list[str]) -> str:
    """The normalised URI if it lies under one of `roots`, else RequestRejected(403).

    Local paths are resolved (symlinks and '..' included) before the comparison, and s3://
    keys are normalised the same way, so '..' cannot lead out of a root."""
    if not roots:
        raise RequestRejected(403, "storage URIs are disabled on this server (no storage_roots "
                                   "configured); upload the files instead")
    resolved = _normalise(uri)
    for root in roots:
        base = _normalise(root).rstrip("/")
        if resolved == base or resolved.startswith(base + "/"):
            return resolved
    raise RequestRejected(403, f"{uri!r} is outside the allowed storage roots")


def _normalise(uri: str) -> str:
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or bucket in (".", ".."):
            raise RequestRejected(400, f"{uri!r} names no bucket")
        # Rooted at '/', normpath cannot climb above the bucket: 'a/../../b' becomes '/b'.
        clean = posixpath.normpath("/" + key)
        return f"s3://{bucket}" + ("" if clean == "/" else clean)
    if "://" in uri:
        raise RequestRejected(400, f"{uri!r}: only local paths and s3:// URIs are supported")
    return os.path.realpath(uri)
