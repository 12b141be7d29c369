"""The Serve app with `few_shot: auto` conditions: an example pool is required, and used."""

import pandas as pd
import pytest

from ray_app.labelling.few_shot import FewShotError
from ray_app.labelling.labeller import ReportTask
from ray_app.serving.app import AppArgs, build_app, make_labeller


@pytest.fixture()
def auto_spec(tmp_path):
    spec = tmp_path / "fracture.yaml"
    spec.write_text("name: fracture\ndefinition: A fracture is a break in a bone.\n"
                    "few_shot: auto\nfew_shot_k: 2\n")
    return str(spec)


def test_auto_condition_without_a_pool_is_refused_before_deploying(auto_spec):
    with pytest.raises(FewShotError, match=r"\['fracture'\] ask for 'few_shot: auto': give the "
                                           r"example pool.*few_shot_pool"):
        build_app({"conditions": [auto_spec], "engine": {"engine": "dry-run"}})
    with pytest.raises(FewShotError, match="given but no condition asks"):
        build_app({"conditions": ["spinal_cancer"], "few_shot_pool": "r.csv",
                   "few_shot_truth": "t.csv", "engine": {"engine": "dry-run"}})


def test_replica_labeller_takes_examples_from_the_pool(auto_spec, tmp_path):
    pd.DataFrame({"report_id": ["a", "b", "c"],
                  "text": ["Acute radius fracture.", "Normal wrist.", "Rib fracture, healing."]}
                 ).to_csv(tmp_path / "pool.csv", index=False)
    pd.DataFrame({"report_id": ["a", "b", "c"], "condition": "fracture", "level": "",
                  "label": [1, 0, 1]}).to_csv(tmp_path / "truth.csv", index=False)
    args = AppArgs(conditions=[auto_spec], engine={"engine": "dry-run"},
                   few_shot_pool=str(tmp_path / "pool.csv"),
                   few_shot_truth=str(tmp_path / "truth.csv"))
    build_app(args.model_dump())
    labeller = make_labeller(args)
    (row,) = labeller.label([ReportTask("req-1", "Distal radius fracture.")])
    assert row["definition_hash"] == labeller.conditions["fracture"].definition_hash()
    assert labeller.conditions["fracture"].few_shot_pool.startswith("pool-")
