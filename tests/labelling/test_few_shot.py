"""Few-shot examples picked per report (`few_shot: auto`, ray_app/labelling/few_shot.py): the
condition field, retrieval, the labeller's prompts, and keeping examples out of thresholds."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import sys
from pathlib import Path

import pandas as pd
import pytest

from ray_app.engines import EngineConfig
from ray_app.engines.dry_run import DryRunEngine
from ray_app.evaluation.calibration import Calibration
from ray_app.labelling.conditions import (
    ConditionError,
    FewShotExample,
    condition_from_dict,
    load_condition,
)
from ray_app.labelling.few_shot import (
    MANIFEST_KEY,
    ExamplePool,
    FewShotError,
    bind_pool,
    check_pool_args,
    drop_example_reports,
    load_pool,
    manifest_entry,
    recorded_examples,
    split_examples,
)
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.pipeline import report_tables as tables

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import calibrate as calibrate_job  # noqa: E402

BASE = {"name": "fracture", "definition": "A fracture is a break in a bone."}
FRACTURE = condition_from_dict({**BASE, "few_shot": "auto"}, "test")

# Pool reports: 'yes' ones about fractures, 'no' ones not; the words make similarity plain.
POOL = {
    "p1": ("FINDINGS: Acute fracture of the left distal radius.", 1),
    "p2": ("FINDINGS: Healing fracture of the right clavicle.", 1),
    "p3": ("FINDINGS: Displaced fracture of the left distal radius with angulation.", 1),
    "p4": ("FINDINGS: Compression fracture of the T12 vertebral body.", 1),
    "n1": ("FINDINGS: Normal left wrist. No radius abnormality.", 0),
    "n2": ("FINDINGS: Normal chest. Clear lungs.", 0),
    "n3": ("FINDINGS: Mild degenerative change of the left distal radius joint.", 0),
    "n4": ("FINDINGS: Small pleural effusion. Clear lungs otherwise.", 0),
}


def pool_frames(pool: dict = POOL,
                condition: str = "fracture") -> tuple[pd.DataFrame, pd.DataFrame]:
    reports = pd.DataFrame({"report_id": list(pool), "text": [t for t, _ in pool.values()]})
    truth = pd.DataFrame({"report_id": list(pool), "condition": condition, "level": "",
                          "label": [label for _, label in pool.values()]})
    return reports, truth


def make_pool(pool: dict = POOL) -> ExamplePool:
    return ExamplePool(*pool_frames(pool), source="test pool")


class RecordingEngine(DryRunEngine):
    """The dry-run engine, keeping every conversation it scored."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.seen: list = []

    def score(self, conversations):
        self.seen.extend(conversations)
        return super().score(conversations)


def engine(max_context_tokens: int = 4096) -> RecordingEngine:
    return RecordingEngine(EngineConfig(engine="dry-run", model="m",
                                        max_context_tokens=max_context_tokens))


# --- the condition field ------------------------------------------------------------------

def test_auto_defaults_to_four_and_changes_only_its_own_hash():
    plain = condition_from_dict(BASE, "test")
    assert (plain.few_shot_k, plain.few_shot_auto) == (0, False)
    assert (FRACTURE.few_shot_k, FRACTURE.few_shot_auto, FRACTURE.few_shot) == (4, True, ())
    six = condition_from_dict({**BASE, "few_shot": "auto", "few_shot_k": 6}, "test")
    hashes = {plain.definition_hash(), FRACTURE.definition_hash(), six.definition_hash(),
              dataclasses.replace(FRACTURE, few_shot_pool="pool-a").definition_hash(),
              dataclasses.replace(FRACTURE, few_shot_pool="pool-b").definition_hash()}
    assert len(hashes) == 5
    # Conditions without auto keep the hash they had before the field existed.
    assert load_condition("spinal_cancer").definition_hash() == "d5e4b655078ae719"


def test_hand_written_examples_and_auto_together():
    condition = condition_from_dict(
        {**BASE, "few_shot": [{"report": "Old healed rib fracture.", "answer": "yes"}, "auto"],
         "few_shot_k": 2}, "test")
    assert condition.few_shot == (FewShotExample("Old healed rib fracture.", "yes"),)
    assert condition.few_shot_k == 2


@pytest.mark.parametrize("fields, message", [
    ({"few_shot": "automatic"},
     (r"'few_shot' must be a list of \{report, answer\} \(optionally with one 'auto' item\) or "
      r"'auto', got 'automatic'")),
    ({"few_shot": ["auto", "auto"]}, r"lists 'auto' 2 times"),
    ({"few_shot_k": 4}, r"'few_shot_k' is only used with 'few_shot: auto'"),
    ({"few_shot": "auto", "few_shot_k": 3}, r"'few_shot_k' must be an even whole number"),
    ({"few_shot": "auto", "few_shot_k": 0}, r"must be an even whole number of at least 2"),
    ({"few_shot": "auto", "few_shot_k": True}, r"got True"),
    ({"few_shot": "auto", "few_shot_k": "4"}, r"got '4'"),
])
def test_bad_auto_fields_are_refused(fields, message):
    with pytest.raises(ConditionError, match=message):
        condition_from_dict({**BASE, **fields}, "my.yaml")


def test_yaml_file_with_auto(tmp_path):
    path = tmp_path / "fracture.yaml"
    path.write_text("name: fracture\ndefinition: A break in a bone.\nfew_shot: auto\n"
                    "few_shot_k: 2\n")
    assert load_condition(path).few_shot_k == 2


# --- retrieval ----------------------------------------------------------------------------

def test_nearest_examples_are_the_most_similar_of_each_class_nearest_last():
    query = "FINDINGS: Fracture of the left distal radius."
    examples = make_pool().nearest(FRACTURE, "q", query)
    by_text = {t: i for i, (t, _) in POOL.items()}
    ids = [by_text[e.report] for e in examples]
    assert sorted(ids[:2] + ids[2:]) == sorted(["p1", "p3", "n1", "n3"])
    assert [e.answer for e in examples].count("yes") == 2
    assert ids[-1] == "p1"  # the closest of all comes last, next to the question
    assert {e.answer for e in examples if by_text[e.report].startswith("p")} == {"yes"}


def test_both_classes_even_when_every_near_report_is_positive():
    examples = make_pool().nearest(FRACTURE, "q", "Compression fracture of T12; fracture.")
    assert sorted(e.answer for e in examples) == ["no", "no", "yes", "yes"]


def test_never_the_report_itself_by_id_or_by_text():
    pool = make_pool()
    text = POOL["p1"][0]
    by_id = pool.nearest(FRACTURE, "p1", "something else about a radius fracture")
    assert POOL["p1"][0] not in [e.report for e in by_id]
    by_text = pool.nearest(FRACTURE, "another-id", "  " + text.replace(" ", "\n  ") + "\n")
    assert text not in [e.report for e in by_text]
    assert len(by_text) == 4


def test_same_text_once_its_sections_are_dropped_is_the_report_itself():
    pool = {**POOL, "h1": ("CLINICAL HISTORY: Fall.\nFINDINGS: Fracture of the distal radius.", 1)}
    condition = dataclasses.replace(FRACTURE, drop_sections=("history",))
    examples = make_pool(pool).nearest(condition, "q", "FINDINGS: Fracture of the distal radius.")
    assert "FINDINGS: Fracture of the distal radius." not in [e.report for e in examples]
    assert len(examples) == 4


def test_examples_lose_the_sections_the_condition_drops():
    history = ("CLINICAL HISTORY: Query fracture after a fall.\nFINDINGS: Acute fracture of the "
               "left distal radius and ulna.")
    pool = {**POOL, "h1": (history, 1)}
    condition = dataclasses.replace(FRACTURE, drop_sections=("history",))
    query = "FINDINGS: Acute fracture of the left distal radius and ulna, displaced."
    examples = make_pool(pool).nearest(condition, "q", query)
    assert examples[-1].report == "FINDINGS: Acute fracture of the left distal radius and ulna."
    assert not any("HISTORY" in e.report for e in examples)
    kept = make_pool(pool).nearest(FRACTURE, "q", pool["h1"][0] + " Displaced.")
    assert kept[-1].report == pool["h1"][0]


def test_deterministic_ties_go_to_the_smaller_id_and_survive_pickling():
    pool = make_pool()
    unrelated = "Qqq zzz"  # nothing in common: every similarity is 0
    first = pool.nearest(FRACTURE, "q", unrelated)
    by_text = {t: i for i, (t, _) in POOL.items()}
    assert sorted(by_text[e.report] for e in first) == ["n1", "n2", "p1", "p2"]
    shipped = pickle.loads(pickle.dumps(pool))
    assert not shipped._indexes  # indexes are rebuilt where the pool is used
    for query in (unrelated, "Fracture of the clavicle.", "Clear lungs."):
        assert shipped.nearest(FRACTURE, "q", query) == pool.nearest(FRACTURE, "q", query)


def test_fewer_examples_when_a_class_lacks_them_said_once(caplog):
    pool = {k: v for k, v in POOL.items() if k in ("p1", "n1", "n2", "n3")}
    caplog.set_level(logging.WARNING)
    examples = make_pool(pool).nearest(FRACTURE, "q", "radius fracture")
    make_pool(pool).check([FRACTURE])
    assert sorted(e.answer for e in examples) == ["no", "no", "yes"]
    assert "only 1 'yes' example(s) for fracture" in caplog.text
    caplog.clear()
    again = make_pool(pool)
    again.nearest(FRACTURE, "q", "radius fracture")
    again.nearest(FRACTURE, "r", "wrist fracture")
    assert caplog.text.count("1 'yes' example(s) available for fracture") == 1


def test_identity_follows_ids_texts_and_labels_of_its_condition_only():
    pool = make_pool()
    relabelled = dict(POOL, n4=(POOL["n4"][0], 1))
    edited = dict(POOL, n4=("FINDINGS: Large pleural effusion.", 0))
    assert make_pool(relabelled).identity("fracture") != pool.identity("fracture")
    assert make_pool(edited).identity("fracture") != pool.identity("fracture")
    reports, truth = pool_frames()
    other = pd.concat([truth, truth.assign(condition="effusion", label=0)], ignore_index=True)
    assert ExamplePool(reports, other).identity("fracture") == pool.identity("fracture")


def test_pool_refuses_duplicate_ids_and_a_condition_it_has_no_labels_for(caplog):
    reports, truth = pool_frames()
    with pytest.raises(FewShotError, match=r"report ids \['p1'\] appear more than once"):
        ExamplePool(pd.concat([reports, reports.head(1)]), truth)
    other = dataclasses.replace(FRACTURE, name="effusion")
    with pytest.raises(FewShotError, match="no report-level hand labels for condition 'effusion'"):
        make_pool().check([other])
    caplog.set_level(logging.WARNING)
    ExamplePool(reports.iloc[1:], truth)
    assert "1 hand-labelled report(s) are not in the reports table (e.g. p1)" in caplog.text


def test_level_labels_are_not_examples():
    reports, truth = pool_frames()
    truth = pd.concat([truth, truth.assign(condition="stenosis", level="L4-L5")])
    assert make_pool().conditions == ExamplePool(reports, truth).conditions == ["fracture"]


def test_pool_from_files(tmp_path):
    reports, truth = pool_frames()
    reports.rename(columns={"report_id": "uid", "text": "body"}).to_parquet(tmp_path / "r.parquet")
    truth.to_csv(tmp_path / "t.csv", index=False)
    pool = load_pool(str(tmp_path / "r.parquet"), str(tmp_path / "t.csv"), "uid", "body")
    assert pool.identity("fracture") == make_pool().identity("fracture")


def test_pool_arguments_are_checked():
    other = condition_from_dict({**BASE, "name": "other"}, "test")
    assert check_pool_args([FRACTURE], "direct", "r.csv", "t.csv")
    assert not check_pool_args([FRACTURE], "summary", None, None)
    assert not check_pool_args([other], "direct", None, None)
    with pytest.raises(FewShotError, match=r"\['fracture'\] ask for 'few_shot: auto': give the "
                                           r"example pool"):
        check_pool_args([FRACTURE, other], "direct", "r.csv", None)
    with pytest.raises(FewShotError, match="given but no condition asks for 'few_shot: auto'"):
        check_pool_args([other], "direct", "r.csv", "t.csv")


# --- the labeller -------------------------------------------------------------------------

def test_conversation_holds_the_picked_examples_before_the_question():
    pool = make_pool()
    recorder = engine()
    query = "FINDINGS: Fracture of the left distal radius."
    rows = Labeller(recorder, [FRACTURE], few_shot_pool=pool).label([ReportTask("q", query)])
    (conversation,) = recorder.seen
    assert conversation[0]["role"] == "system" and query in conversation[0]["content"]
    picked = pool.nearest(FRACTURE, "q", query)
    turns = conversation[1:-1]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 4
    assert [t["content"].split("\n")[0] for t in turns[::2]] == [f"Report: {e.report}"
                                                                 for e in picked]
    assert [t["content"] for t in turns[1::2]] == [e.answer for e in picked]
    # The question restates its report: after the examples' reports, "the report" would be theirs.
    assert conversation[-1]["role"] == "user"
    assert conversation[-1]["content"].startswith(f"Report: {query}\n")
    assert rows[0]["definition_hash"] == bind_pool([FRACTURE], pool)[0].definition_hash()
    assert rows[0]["definition_hash"] != FRACTURE.definition_hash()


def test_hand_written_examples_come_first():
    condition = dataclasses.replace(FRACTURE, few_shot=(FewShotExample("Rib fracture.", "yes"),),
                                    few_shot_k=2)
    recorder = engine()
    Labeller(recorder, [condition], few_shot_pool=make_pool()).label([ReportTask("q", "fracture")])
    users = [t["content"] for t in recorder.seen[0] if t["role"] == "user"]
    assert users[0].startswith("Report: Rib fracture.\n") and len(users) == 4


def test_each_report_gets_its_own_examples():
    recorder = engine()
    Labeller(recorder, [FRACTURE], few_shot_pool=make_pool()).label(
        [ReportTask("a", "Fracture of the clavicle."), ReportTask("b", "Pleural effusion.")])
    first, second = ([t["content"] for t in c[1:-1]] for c in recorder.seen)
    assert first != second


def test_examples_count_against_the_context_and_go_before_the_report_is_cut(caplog):
    query = "FINDINGS: Fracture of the left distal radius. " * 3
    full = engine()
    Labeller(full, [FRACTURE], few_shot_pool=make_pool()).label([ReportTask("q", query)])
    needed = full.count_tokens(full.seen[0]) + 1
    caplog.set_level(logging.WARNING)
    tight = engine(needed - 1)
    rows = Labeller(tight, [FRACTURE], few_shot_pool=make_pool()).label([ReportTask("q", query)])
    (conversation,) = tight.seen
    assert tight.count_tokens(conversation) + 1 <= needed - 1
    assert len(conversation) == 1 + 2 * 2 + 1  # the least similar pair left out
    assert not rows[0]["truncated"] and query.strip() in conversation[0]["content"]
    assert "2 of 4 few-shot examples left out to fit" in caplog.text


def test_labeller_refuses_auto_without_a_pool_but_summary_needs_none():
    with pytest.raises(FewShotError, match=r"\['fracture'\] ask for 'few_shot: auto' but no "
                                           r"example pool"):
        Labeller(engine(), [FRACTURE])
    rows = Labeller(engine(), [FRACTURE], method="summary").label([ReportTask("q", "x")])
    assert rows[0]["definition_hash"] == FRACTURE.definition_hash()


def test_calibration_holds_for_its_pool_only():
    pool = make_pool()
    bound = bind_pool([FRACTURE], pool)[0]
    recorder = engine()
    prompt_hash = Labeller(recorder, [bound], few_shot_pool=pool).prompt_hash
    calibration = Calibration(model=recorder.model_id, method="direct", prompt_hash=prompt_hash,
                              definition_hashes={"fracture": bound.definition_hash()}, entries=())
    Labeller(recorder, [FRACTURE], calibration=calibration, few_shot_pool=pool)
    other = make_pool({k: v for k, v in POOL.items() if k != "n4"})
    with pytest.raises(ValueError, match="definition of 'fracture' changed since calibration"):
        Labeller(recorder, [FRACTURE], calibration=calibration, few_shot_pool=other)


# --- examples and thresholds apart --------------------------------------------------------

def test_split_examples_is_seeded_disjoint_and_keeps_positives_on_both_sides():
    truth = pd.DataFrame({"report_id": [f"r{i:02d}" for i in range(40)], "condition": "fracture",
                          "level": "", "label": [1 if i % 5 == 0 else 0 for i in range(40)]})
    examples, threshold = split_examples(truth, 0.3, seed=1)
    again, _ = split_examples(truth, 0.3, seed=1)
    other, _ = split_examples(truth, 0.3, seed=2)
    assert examples.equals(again) and not examples.equals(other)
    assert not set(examples["report_id"]) & set(threshold["report_id"])
    assert len(examples) + len(threshold) == 40 and len(examples) == 12
    assert examples["label"].sum() >= 2 and threshold["label"].sum() >= 2
    with pytest.raises(FewShotError, match="between 0 and 1"):
        split_examples(truth, 0.0)


def write_label_folder(out: Path, pool: ExamplePool | None, ids: list[str],
                       scores: list[float]) -> None:
    loc = tables.locate(str(out))
    rows = [{c: None for c in tables.LABEL_SCHEMA.names} | {
        "report_id": i, "condition": "fracture", "level": None, "method": "direct", "score": s,
        "model": "dry-run:m", "engine": "dry-run", "definition_hash": "h", "prompt_hash": "p"}
        for i, s in zip(ids, scores)]
    tables.write_table_atomically(tables.rows_table(rows, tables.LABEL_SCHEMA),
                                  loc.child("labels"))
    tables.write_manifest(loc, {"model": "dry-run:m",
                                **manifest_entry(bind_pool([FRACTURE], pool), pool)})


def test_recorded_examples_come_from_the_manifest(tmp_path):
    write_label_folder(tmp_path / "out", make_pool(), ["q1"], [0.5])
    write_label_folder(tmp_path / "plain", None, ["q1"], [0.5])
    expected = {"fracture": set(POOL)}
    assert recorded_examples([str(tmp_path / "out")]) == expected
    assert recorded_examples([str(tmp_path / "out" / "labels")]) == expected
    assert recorded_examples([str(tmp_path / "plain")]) == {}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest[MANIFEST_KEY]["fracture"]["pool"] == make_pool().identity("fracture")


def test_example_reports_are_dropped_from_the_truth_with_a_warning(caplog):
    truth = pd.DataFrame({"report_id": ["p1", "n1", "q1", "q2", "p1"],
                          "condition": ["fracture"] * 4 + ["effusion"], "level": "",
                          "label": [1, 0, 1, 0, 0]})
    caplog.set_level(logging.WARNING)
    kept = drop_example_reports(truth, {"fracture": set(POOL)})
    assert list(zip(kept["report_id"], kept["condition"])) == [
        ("q1", "fracture"), ("q2", "fracture"), ("p1", "effusion")]  # p1 was no effusion example
    assert "2 hand label(s) of 2 report(s) left out of the calibration" in caplog.text
    assert drop_example_reports(truth, {}) is truth
    with pytest.raises(FewShotError, match="every hand label given for fracture is of a report "
                                           "that the labels showed as a few-shot example"):
        drop_example_reports(truth.iloc[[0, 1, 4]], {"fracture": set(POOL)})


def test_calibrate_job_leaves_the_example_reports_out(tmp_path, caplog):
    # Scores that would put the threshold elsewhere if the example reports p1/n1 counted.
    write_label_folder(tmp_path / "out", make_pool(), ["p1", "n1", "q1", "q2", "q3", "q4"],
                       [0.01, 0.99, 0.9, 0.8, 0.3, 0.2])
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"report_id": ["p1", "n1", "q1", "q2", "q3", "q4"], "condition": "fracture",
                  "level": "", "label": [1, 0, 1, 1, 0, 0]}).to_csv(truth, index=False)
    caplog.set_level(logging.WARNING)
    calibrate_job.main(["--labels", str(tmp_path / "out"), "--truth", str(truth),
                        "--out", str(tmp_path / "cal.json")])
    (entry,) = Calibration.load(tmp_path / "cal.json").entries
    assert (entry.n, entry.positives, entry.auroc) == (4, 2, 1.0)
    assert "left out of the calibration" in caplog.text
