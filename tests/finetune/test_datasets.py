"""The three training-data builders: what becomes an example, and why other reports do not."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from ray_app.finetune.datasets import (
    impression_examples,
    labeller_examples,
    read_reports,
    summary_examples,
)
from ray_app.labelling.conditions import condition_from_dict

REPORTS = pd.DataFrame({
    "report_id": ["full", "findings-only", "no-headers", "impression-only", "empty", None],
    "text": [
        "History: ?pneumonia.\nFINDINGS: Enlarged heart.\nIMPRESSION: Cardiomegaly.",
        "FINDINGS: Lungs clear.",
        "The lungs are clear.",
        "Impression: Normal chest.",
        "   ",
        "FINDINGS: x\nIMPRESSION: y",
    ],
})
HEART = condition_from_dict({"name": "cardiomegaly", "definition": "An enlarged heart.",
                             "drop_sections": ["history"]}, "test")
STENOSIS = condition_from_dict({"name": "stenosis", "definition": "Narrowing.",
                                "levels": ["L4-L5"]}, "test")


def test_summary_examples_and_reasons():
    examples, report = summary_examples(REPORTS)
    assert [(e.example_id, e.prompt, e.target) for e in examples] == [
        ("full", "History: ?pneumonia.\nFINDINGS: Enlarged heart.\nIMPRESSION:", " Cardiomegaly."),
        # findings counts as the summary when there is no impression, but then nothing
        # precedes it; the impression-only report likewise has no context
    ]
    assert (report.reports, report.reports_used, report.examples) == (6, 1, 1)
    assert report.skipped == {
        "nothing before the summary section to use as context": 2,
        "no summary section (impression/conclusion/summary/findings) found": 1,
        "report text is empty": 1, "missing id": 1,
    }
    assert "1 examples from 1 of 6 reports" in report.summary()


def test_summary_kinds_restrict_what_counts():
    reports = pd.DataFrame({"report_id": ["a", "b"],
                            "text": ["History: cough.\nFindings: Clear lungs.",
                                     "Comparison: none.\nConclusion: Normal."]})
    examples, report = summary_examples(reports, kinds=["impression"])
    assert [e.target for e in examples] == [" Normal."]
    assert report.skipped == {"summary is a findings section, not one of ['impression']": 1}
    examples, _ = summary_examples(reports)
    assert [e.target for e in examples] == [" Clear lungs.", " Normal."]


def test_impression_examples():
    examples, report = impression_examples(REPORTS)
    assert len(examples) == 1 and examples[0].target == "Cardiomegaly."
    request = examples[0].prompt[0]["content"]
    assert request.endswith("Findings: Enlarged heart.") and "pneumonia" not in request
    assert report.skipped["no non-empty impression section"] == 1
    assert report.skipped["no non-empty findings section"] == 2


def test_labeller_examples_several_conditions_per_report():
    labels = pd.DataFrame({
        "report_id": ["full", "full", "full", "full", "impression-only", "unknown"],
        "condition": ["cardiomegaly", "stenosis", "stenosis", "stenosis", "cardiomegaly",
                      "cardiomegaly"],
        "level": [None, "", "L4-L5", "C1-C2", "", ""],
        "label": [1, 0, 1, 1, 0, 1],
    })
    examples, report = labeller_examples(REPORTS, labels, [HEART, STENOSIS])
    got = {e.example_id: e.target for e in examples}
    assert got == {"full/cardiomegaly/": "yes", "full/stenosis/": "no",
                   "full/stenosis/L4-L5": "yes", "impression-only/cardiomegaly/": "no"}
    assert all(not e.end_turn for e in examples)
    heart = next(e for e in examples if e.example_id == "full/cardiomegaly/")
    assert "pneumonia" not in heart.prompt[0]["content"]  # history dropped, as when labelling
    assert "at L4-L5" in next(e for e in examples if e.example_id.endswith("L4-L5")).prompt[-1][
        "content"]
    assert report.reports_used == 2
    assert report.skipped["level 'C1-C2' is not a level of stenosis"] == 1
    assert report.skipped["no labels for the chosen conditions"] == 2


def test_labeller_examples_of_a_sentence_unit_are_whole_reports_and_say_so(caplog):
    labels = pd.DataFrame({"report_id": ["full"], "condition": ["cardiomegaly"], "label": [1]})
    by_sentence = dataclasses.replace(HEART, unit="sentence")
    examples, _ = labeller_examples(REPORTS, labels, [by_sentence])
    whole, _ = labeller_examples(REPORTS, labels, [HEART])
    assert [e.prompt for e in examples] == [e.prompt for e in whole]
    assert "['cardiomegaly'] are asked sentence by sentence" in caplog.text


def test_labeller_rejects_bad_label_tables():
    with pytest.raises(ValueError, match="lacks column"):
        labeller_examples(REPORTS, pd.DataFrame({"report_id": ["full"]}), [HEART])
    bad = pd.DataFrame({"report_id": ["full"], "condition": ["cardiomegaly"], "level": [""],
                        "label": [2]})
    with pytest.raises(ValueError, match="not 0/1"):
        labeller_examples(REPORTS, bad, [HEART])


def test_read_reports_formats(tmp_path):
    frame = pd.DataFrame({"id": ["007", "8"], "body": ["FINDINGS: a\nIMPRESSION: b", None]})
    frame.to_csv(tmp_path / "r.csv", index=False)
    frame.to_json(tmp_path / "r.jsonl", orient="records", lines=True)
    for name, missing in (("r.csv", ""), ("r.jsonl", None)):  # CSV cannot tell "" from null
        got = read_reports(str(tmp_path / name), "id", "body")
        assert got["report_id"].tolist() == ["007", "8"]
        assert got["text"].tolist() == ["FINDINGS: a\nIMPRESSION: b", missing]
        _, report = summary_examples(got)
        assert report.reports_used == 1 and sum(report.skipped.values()) == 1
    with pytest.raises(KeyError, match="'text' not in"):
        read_reports(str(tmp_path / "r.csv"), "id", "text")
