"""Resume state as hash indexes (ray_app/pipeline/resume.py): what a rerun skips, without Ray."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_app.pipeline import report_tables as tables
from ray_app.pipeline import resume


def _index(pairs):
    return resume.KeyIndex.build([resume.key_hashes([p[0] for p in pairs], [p[1] for p in pairs])])


def test_key_index_answers_membership_of_pairs_exactly():
    done = _index([("r1", "cancer"), ("r1", "stenosis"), ("r2", "cancer"), ("r1", "cancer")])
    assert len(done) == 3  # one key per (report, condition), however many level rows it has
    found = done.contains(["r1", "r2", "r2", "r3", "r1"],
                          ["cancer", "cancer", "stenosis", "cancer", "stenosis"])
    assert found.tolist() == [True, True, False, False, True]
    # The two columns are a pair, not a concatenation: ("r1c", "ancer") is another key.
    assert not done.contains(["r1c"], ["ancer"]).any()
    assert resume.KeyIndex.build([]).contains(["r1"], ["cancer"]).tolist() == [False]


def test_key_index_with_equal_first_hashes_compares_the_second():
    index = resume.KeyIndex(np.array([5, 5, 9], np.uint64), np.array([1, 2, 3], np.uint64))
    first, second = resume.key_hashes(["x"])
    index = resume.KeyIndex(np.array([first[0], first[0]], np.uint64),
                            np.sort(np.array([second[0] + np.uint64(1), second[0]], np.uint64)))
    assert index.contains(["x"]).tolist() == [True]
    miss = resume.KeyIndex(np.array([first[0], first[0]], np.uint64),
                           np.array([second[0] + np.uint64(1), second[0] + np.uint64(2)], np.uint64))
    assert miss.contains(["x"]).tolist() == [False]


def _id_batches(*batches):
    return lambda: iter([pa.array(b, type=pa.string()) for b in batches])


def test_scan_ids_counts_duplicates_as_clean_id_sees_them_across_batches():
    done = _index([("a", "c1"), ("a", "c2"), ("7", "c1")])
    scan = resume.scan_ids(_id_batches(["a", "b", " 7 ", None], ["7", "", "b", "00123"]),
                           ["c1", "c2"], done)
    assert (scan.rows, scan.missing_ids) == (8, 2)
    assert scan.duplicates == {"b": 2, "7": 2}
    # present ids: a b 7 7 b 00123 -> 12 pairs; done: (a, c1), (a, c2), and (7, c1) twice
    assert scan.pairs_to_do == 12 - 4


def test_plan_batch_sends_only_unfinished_work_and_rows_to_report():
    done = _index([("r1", "cancer"), ("r1", "stenosis"), ("r2", "cancer")])
    errored_key = tables.row_key("r4", "old bad text")
    state = resume.ResumeState(done, resume.KeyIndex.build([resume.key_hashes([errored_key])]),
                               {"dup": 2})
    batch = pd.DataFrame({"id": ["r1", "r2", "00123", "r4", "dup", None],
                          "text": ["t1", "t2", "t3", "old bad text", "t5", "t6"]})
    planned = resume.plan_batch(batch, "id", "text", ["cancer", "stenosis"], state)
    assert planned["id"].tolist()[:3] == ["r2", "00123", "dup"] and pd.isna(planned["id"][3])
    assert planned[resume.TODO_COLUMN].tolist() == [
        "stenosis", "cancer\nstenosis", "cancer\nstenosis", "cancer\nstenosis"]
    assert planned[resume.DUPLICATES_COLUMN].tolist() == [1, 1, 2, 1]
    assert planned["text"].tolist() == ["t2", "t3", "t5", "t6"]


def test_finished_state_streams_labels_and_row_errors(tmp_path):
    out = tables.locate(str(tmp_path))
    labels = [{"report_id": "r1", "condition": "cancer", "level": lv} for lv in (None, "L1-L2")]
    tables.write_table_atomically(pa.Table.from_pylist(labels, schema=tables.LABEL_SCHEMA),
                                  out.child("labels"))
    errors = [{"row_key": "k-row", "condition": None}, {"row_key": "k-cond", "condition": "cancer"}]
    tables.write_table_atomically(pa.Table.from_pylist(errors, schema=tables.ERROR_SCHEMA),
                                  out.child("errors"))
    state = resume.finished_state(out)
    assert state.done_pairs == 1 and state.done.contains(["r1"], ["cancer"]).all()
    # Only whole-row errors are final; an engine error on one condition is tried again.
    assert state.errored.contains(["k-row", "k-cond"]).tolist() == [True, False]
