"""Bearer tokens, sizes and storage roots (ray_app/serving/request_safety.py)."""

from __future__ import annotations

import os

import pytest

from ray_app.serving.request_safety import (
    RequestRejected,
    allowed_uri,
    check_bearer,
    check_report,
    check_size,
)


def rejected(call, *args) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        call(*args)
    return info.value


def test_bearer_token():
    check_bearer(None, None)  # auth off
    check_bearer("Bearer s3cret", "s3cret")
    check_bearer("bearer s3cret", "s3cret")
    assert rejected(check_bearer, None, "s3cret").status == 401
    assert "missing bearer token" in rejected(check_bearer, "Basic abc", "s3cret").message
    assert rejected(check_bearer, "Bearer s3cre", "s3cret").message == "invalid bearer token"


def test_sizes():
    check_size(10, 10, "the upload")
    err = rejected(check_size, 11, 10, "the upload")
    assert err.status == 413 and "the upload is 11 bytes; the limit is 10" in err.message
    check_report("FINDINGS: fine.", 100)
    assert rejected(check_report, "x" * 101, 100).status == 413
    assert rejected(check_report, "  \n", 100).status == 422


def test_local_paths_stay_under_their_root(tmp_path):
    root = tmp_path / "studies"
    (root / "s1").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    assert allowed_uri(str(root / "s1"), [str(root)]) == os.path.realpath(root / "s1")
    for bad in (str(root / ".." / "secret"), str(tmp_path / "studies-other"), "/etc/passwd"):
        assert rejected(allowed_uri, bad, [str(root)]).status == 403, bad


def test_symlink_out_of_a_root_is_refused(tmp_path):
    root = tmp_path / "studies"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    assert rejected(allowed_uri, str(root / "link"), [str(root)]).status == 403


def test_s3_keys_are_normalised_before_the_comparison():
    roots = ["s3://pacs/studies/"]
    assert allowed_uri("s3://pacs/studies/a/b", roots) == "s3://pacs/studies/a/b"
    assert allowed_uri("s3://pacs/studies/a/../b", roots) == "s3://pacs/studies/b"
    for bad in ("s3://pacs/studies/../private/x", "s3://pacs/studies-x/a", "s3://other/studies/a",
                "s3://pacs/studies/../../../etc"):
        assert rejected(allowed_uri, bad, roots).status == 403, bad


def test_uris_without_roots_or_with_other_schemes():
    assert "disabled" in rejected(allowed_uri, "/data/x", []).message
    assert rejected(allowed_uri, "http://host/x", ["/data"]).status == 400
    assert rejected(allowed_uri, "s3:///key", ["s3://b/"]).status == 400
