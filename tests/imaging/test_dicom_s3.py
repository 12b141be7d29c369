"""DICOM files and the locations table under an s3:// prefix (moto's server on 127.0.0.1, the
wrapper of tests/s3_server.py): same studies, volumes and errors as from the local folder."""

from __future__ import annotations

import numpy as np
import pytest
from s3_server import BUCKET, _client

from ray_app.imaging.dicom_series import SelectionRule
from ray_app.imaging.dicom_store import DicomStore
from ray_app.imaging.disc_volumes import read_locations
from ray_app.imaging.studies import find_studies, study_disc_volumes


@pytest.mark.timeout(120)
def test_s3_prefix_reads_like_the_local_folder(few_phantoms, s3_endpoint):
    endpoint = s3_endpoint
    client = _client(endpoint)
    root = few_phantoms["dicom"]
    for path in root.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=BUCKET, Key=f"mri/{path.relative_to(root)}", Body=path.read_bytes())
    client.put_object(Bucket=BUCKET, Key="discs.csv", Body=few_phantoms["locations"].read_bytes())

    remote, remote_errors = find_studies(DicomStore.from_uri(f"s3://{BUCKET}/mri", endpoint))
    local, local_errors = find_studies(DicomStore.from_uri(str(root)))
    assert sorted(remote) == sorted(local) and len(remote) == 4
    assert sorted(e.reason for e in remote_errors) == sorted(e.reason for e in local_errors)

    locations = read_locations(f"s3://{BUCKET}/discs.csv", endpoint)
    study = sorted(remote)[0]
    store = DicomStore.from_uri(f"s3://{BUCKET}/mri", endpoint)
    discs, _ = study_disc_volumes(store, remote[study], locations[locations["study_uid"] == study],
                                  SelectionRule(), (3, 24, 48), None)
    local_discs, _ = study_disc_volumes(DicomStore.from_uri(str(root)), local[study],
                                        locations[locations["study_uid"] == study],
                                        SelectionRule(), (3, 24, 48), None)
    assert len(discs) == 5
    for a, b in zip(discs, local_discs):
        np.testing.assert_array_equal(a.pixels, b.pixels)
