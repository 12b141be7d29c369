"""The labeller core with a tiny model: rows, methods, calibration, truncation."""

import dataclasses
import json

import pytest

from ray_app.engines import EngineConfig, make_engine
from ray_app.evaluation.calibration import Calibration, CalibrationError, ThresholdEntry
from ray_app.labelling.conditions import load_condition
from ray_app.labelling.labeller import LABEL_COLUMNS, Labeller, ReportTask
from ray_app.labelling.prompts import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE
from ray_app.labelling.sections import TRUNCATION_MARK

REPORT = ("CLINICAL HISTORY: known breast cancer, ?metastasis.\nFINDINGS: Moderate central canal "
          "stenosis at L4-L5. No suspicious marrow lesion.\nIMPRESSION: No metastasis.")
TASKS = [ReportTask("a", REPORT), ReportTask("b", "Normal lumbar spine MRI.")]


@pytest.fixture(scope="module")
def conditions():
    return [load_condition("spinal_cancer"), load_condition("spinal_canal_stenosis")]


@pytest.mark.parametrize("method", ["direct", "summary"])
def test_one_row_per_report_condition_level(tiny_engine, conditions, method):
    rows = Labeller(tiny_engine, conditions, method).label(TASKS)
    keys = [(r["report_id"], r["condition"], r["level"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * (1 + 6)
    assert all(set(r) == set(LABEL_COLUMNS) for r in rows)
    assert all(0.0 <= r["score"] <= 1.0 and r["label"] is None for r in rows)
    assert {r["prompt_hash"] for r in rows} == {DEFAULT_TEMPLATE.template_hash(method)}
    summaries = {r["summary"] for r in rows}
    assert (summaries == {None}) == (method == "direct")


def test_summary_rows_of_one_report_condition_share_one_summary(tiny_engine, conditions):
    rows = Labeller(tiny_engine, conditions, "summary").label(TASKS[:1])
    stenosis = [r["summary"] for r in rows if r["condition"] == "spinal_canal_stenosis"]
    assert len(stenosis) == 6 and len(set(stenosis)) == 1 and stenosis[0]


def test_only_requested_conditions_are_labelled(tiny_engine, conditions):
    rows = Labeller(tiny_engine, conditions).label([ReportTask("a", REPORT, ("spinal_cancer",))])
    assert [r["condition"] for r in rows] == ["spinal_cancer"]


def test_history_dropped_for_cancer_changes_the_score(tiny_engine):
    cancer = load_condition("spinal_cancer")
    kept = cancer.__class__(**{**cancer.__dict__, "drop_sections": ()})
    dropped_score = Labeller(tiny_engine, [cancer]).label(TASKS[:1])[0]["score"]
    kept_score = Labeller(tiny_engine, [kept]).label(TASKS[:1])[0]["score"]
    assert dropped_score != pytest.approx(kept_score, abs=1e-6)


def test_calibrated_labels_use_the_threshold(tiny_engine, conditions):
    scores = Labeller(tiny_engine, conditions[:1]).label(TASKS)
    middle = sorted(r["score"] for r in scores)[0] + 1e-9  # 'a' or 'b' falls each side
    calibration = Calibration(
        model=tiny_engine.model_id, method="direct",
        prompt_hash=DEFAULT_TEMPLATE.template_hash("direct"),
        definition_hashes={"spinal_cancer": conditions[0].definition_hash()},
        entries=(ThresholdEntry("spinal_cancer", None, middle, 10, 5, 0.9, 0.1),),
    )
    rows = Labeller(tiny_engine, conditions[:1], calibration=calibration).label(TASKS)
    assert sorted(r["label"] for r in rows) == [False, True]
    assert all(r["threshold"] == middle and r["calibration_id"] == calibration.calibration_id
               for r in rows)
    assert all(r["uncertain"] is None for r in rows)  # this entry has no band


def test_rows_inside_the_band_are_uncertain(tiny_engine, conditions):
    low, high = sorted(r["score"] for r in Labeller(tiny_engine, conditions[:1]).label(TASKS))
    calibration = Calibration(
        model=tiny_engine.model_id, method="direct",
        prompt_hash=DEFAULT_TEMPLATE.template_hash("direct"),
        definition_hashes={"spinal_cancer": conditions[0].definition_hash()},
        entries=(ThresholdEntry("spinal_cancer", None, high, 40, 20, 0.9, 0.1,
                                band_low=low, band_high=high),),
    )
    rows = Labeller(tiny_engine, conditions[:1], calibration=calibration).label(TASKS)
    flags = {r["score"]: r["uncertain"] for r in rows}
    assert flags == {low: True, high: False}  # the band is [low, high)


def test_prompt_variant_changes_scores_and_hash(tiny_engine, conditions):
    variant = dataclasses.replace(DEFAULT_TEMPLATE, name="terse",
                                  direct_question="Does the patient have {condition}{at_level}?")
    paper = Labeller(tiny_engine, conditions[:1]).label(TASKS)
    terse = Labeller(tiny_engine, conditions[:1], template=variant).label(TASKS)
    assert {r["prompt_hash"] for r in terse} == {variant.template_hash("direct")}
    assert terse[0]["prompt_hash"] != paper[0]["prompt_hash"]
    assert [r["score"] for r in terse] != [r["score"] for r in paper]


def test_calibration_for_another_model_is_refused(tiny_engine, conditions):
    calibration = Calibration(
        model="other-model", method="direct", prompt_hash=DEFAULT_TEMPLATE.template_hash("direct"),
        definition_hashes={"spinal_cancer": conditions[0].definition_hash()},
        entries=(ThresholdEntry("spinal_cancer", None, 0.5, 10, 5, 0.9, 0.1),),
    )
    with pytest.raises(CalibrationError, match="model"):
        Labeller(tiny_engine, conditions[:1], calibration=calibration)


def test_long_report_is_shortened_keeping_the_impression(tiny_model_dir, conditions):
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), max_context_tokens=400))
    findings = " ".join(f"Finding number {i} is unremarkable." for i in range(200))
    report = f"FINDINGS: {findings}\nIMPRESSION: Severe stenosis at L4-L5."
    labeller = Labeller(engine, conditions[1:])
    rows = labeller.label([ReportTask("long", report)])
    assert all(r["truncated"] for r in rows) and len(rows) == 6
    item = labeller._prepare("long", report, conditions[1])
    assert item.report.endswith("IMPRESSION: Severe stenosis at L4-L5.")
    assert labeller._fits(item.report, conditions[1])


def test_a_long_report_asked_by_sentence_is_not_shortened_but_a_long_sentence_is(
        tiny_model_dir, conditions):
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir),
                                      max_context_tokens=400))
    labeller = Labeller(engine, [by_sentence(conditions[0])])
    findings = " ".join(f"Finding number {i} is unremarkable." for i in range(200))
    fine, = labeller.label([ReportTask("long", f"FINDINGS: {findings}")])
    assert not fine["truncated"] and fine["evidence"].startswith("Finding number")
    endless = "Finding " + " and ".join(f"number {i}" for i in range(300)) + "."
    cut, = labeller.label([ReportTask("sentence", endless)])
    assert cut["truncated"] and TRUNCATION_MARK.strip() in cut["evidence"]


def test_unknown_method_is_refused(tiny_engine, conditions):
    with pytest.raises(ValueError, match="method 'guess'"):
        Labeller(tiny_engine, conditions, "guess")


# --- unit: sentence -----------------------------------------------------------------------------


def by_sentence(condition):
    return dataclasses.replace(condition, unit="sentence")


def test_a_sentence_unit_scores_the_report_as_its_highest_sentence(tiny_engine, conditions):
    """Each sentence is asked about in the report's place; the row keeps the highest score and
    the sentence that gave it, and equals asking about that sentence as a report of its own."""
    cancer = by_sentence(conditions[0])
    row, = Labeller(tiny_engine, [cancer]).label(TASKS[:1])
    sentences = ["Moderate central canal stenosis at L4-L5.", "No suspicious marrow lesion.",
                 "No metastasis."]  # the history is dropped, as for the whole report
    alone = Labeller(tiny_engine, [conditions[0]]).label(
        [ReportTask(str(i), s) for i, s in enumerate(sentences)])
    best = max(alone, key=lambda r: r["score"])
    assert row["evidence"] == sentences[int(best["report_id"])]
    assert row["score"] == pytest.approx(best["score"], abs=1e-6)
    assert len({round(r["score"], 6) for r in alone}) > 1  # the sentences score differently
    assert row["definition_hash"] == cancer.definition_hash() != conditions[0].definition_hash()


def test_report_unit_rows_have_no_evidence_and_levels_take_their_own_best_sentence(
        tiny_engine, conditions):
    rows = Labeller(tiny_engine, [conditions[0], by_sentence(conditions[1])]).label(TASKS)
    assert {r["evidence"] for r in rows if r["condition"] == "spinal_cancer"} == {None}
    stenosis = [r for r in rows if r["condition"] == "spinal_canal_stenosis"]
    assert len(stenosis) == 2 * 6 and all(r["evidence"] for r in stenosis)  # overall + 5 levels
    only = {r["evidence"] for r in stenosis if r["report_id"] == "b"}
    assert only == {"Normal lumbar spine MRI."}


def test_a_report_without_a_sentence_is_asked_about_whole(tiny_engine, conditions):
    row, = Labeller(tiny_engine, [by_sentence(conditions[0])]).label([ReportTask("c", "L4-5 ?")])
    whole, = Labeller(tiny_engine, [conditions[0]]).label([ReportTask("c", "L4-5 ?")])
    assert row["evidence"] == "L4-5 ?" and row["score"] == pytest.approx(whole["score"], abs=1e-6)


def test_the_summary_method_refuses_a_sentence_unit(tiny_engine, conditions):
    with pytest.raises(ValueError, match=r"\['spinal_cancer'\] are asked sentence by sentence"):
        Labeller(tiny_engine, [by_sentence(conditions[0])], "summary")


def test_a_reports_questions_about_one_sentence_reach_the_engine_together(
        tiny_engine, conditions, monkeypatch):
    """The engine runs a shared prefix once only for consecutive prompts: with the wording
    that puts the report (here: the sentence) before every condition's question, the prompts
    about one sentence come one after the other."""
    seen = []
    score = tiny_engine.score
    monkeypatch.setattr(tiny_engine, "score", lambda asked: seen.extend(asked) or score(asked))
    sentence_conditions = [by_sentence(c) for c in conditions]
    rows = Labeller(tiny_engine, sentence_conditions,
                    template=BUILTIN_TEMPLATES["definitions_first"]).label(TASKS)
    contexts = [json.dumps(conversation[0]) for conversation in seen]  # holds the sentence
    runs = [c for k, c in enumerate(contexts) if k == 0 or contexts[k - 1] != c]
    # Report a: three sentences, and its history (kept for stenosis); report b: one.
    assert len(runs) == len(set(contexts)) == 4 + 1
    assert len(seen) == 3 * 1 + 4 * 6 + 1 * (1 + 6)  # per sentence: each condition and level
    assert len(rows) == 2 * (1 + 6)
    assert Labeller(tiny_engine, sentence_conditions, template=BUILTIN_TEMPLATES[
        "definitions_first"]).engine_prompts(TASKS) == seen  # what benchmarks count
