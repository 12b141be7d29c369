"""Report tables in, label tables out (ray_app/pipeline/report_tables.py): no Ray needed."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from frames import write_frame

from ray_app.pipeline import report_tables as tables

TEXT = "FINDINGS: Mild central canal stenosis at L4-L5.\nIMPRESSION: Mild stenosis at L4-L5."


def read_column(loc, fmt, column):
    """The whole column, as the driver's batch-by-batch pass sees it."""
    return pa.chunked_array(list(tables.iter_column(loc, fmt, column)), type=pa.string())


# --- formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, fmt", [
    ("reports.csv", "csv"), ("REPORTS.CSV", "csv"), ("a/b/reports.parquet", "parquet"),
    ("reports.pq", "parquet"), ("reports.jsonl", "json"), ("reports.json", "json"),
    ("s3://bucket/folder/reports.parquet/", "parquet"),
])
def test_table_format_from_extension(uri, fmt):
    assert tables.table_format(uri) == fmt


def test_table_format_explicit_wins_over_extension():
    assert tables.table_format("export.txt", "csv") == "csv"
    assert tables.table_format("reports.csv", "parquet") == "parquet"


def test_table_format_unknown_extension_says_what_to_do():
    with pytest.raises(ValueError) as err:
        tables.table_format("s3://bucket/reports_folder")
    message = str(err.value)
    assert "reports_folder" in message and "--input-format" in message
    assert "csv" in message and "parquet" in message and "json" in message


def test_table_format_rejects_unknown_explicit_format():
    with pytest.raises(ValueError, match="'xlsx' is not one of"):
        tables.table_format("reports.xlsx", "xlsx")


# --- reading columns ------------------------------------------------------------------------

def test_read_column_csv_keeps_ids_as_strings(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text('report_id,text,age\n007,"FINDINGS: normal.\nIMPRESSION: normal.",61\n'
                    "0100,Normal study.,70\n12,Disc bulge.,44\n")
    loc = tables.locate(str(path))
    ids = read_column(loc, "csv", "report_id")
    assert ids.type == pa.string()
    assert ids.to_pylist() == ["007", "0100", "12"]
    assert read_column(loc, "csv", "text").to_pylist()[0] == (
        "FINDINGS: normal.\nIMPRESSION: normal.")


def test_read_column_csv_larger_than_one_block_with_multiline_texts(tmp_path):
    # Arrow splits a CSV into ~1 MB blocks at newlines: quoted multi-line texts need
    # newlines_in_values, or the reader fails as soon as the file spans two blocks.
    n = 8000
    frame = pd.DataFrame({"report_id": [f"{i:05d}" for i in range(n)],
                          "text": [f"FINDINGS:\nReport {i}, with a comma.\nIMPRESSION: \"ok\"\n" * 5
                                   for i in range(n)]})
    path = tmp_path / "big.csv"
    frame.to_csv(path, index=False)
    assert path.stat().st_size > 2_000_000
    ids = read_column(tables.locate(str(path)), "csv", "report_id")
    assert ids.to_pylist() == frame["report_id"].tolist()


def test_read_column_parquet_casts_to_string(tmp_path):
    path = tmp_path / "reports.parquet"
    pq.write_table(pa.table({"rid": [7, 8, 9], "body": ["a", "b", None]}), path)
    loc = tables.locate(str(path))
    assert read_column(loc, "parquet", "rid").to_pylist() == ["7", "8", "9"]
    assert read_column(loc, "parquet", "body").to_pylist() == ["a", "b", None]


def test_read_column_parquet_folder(tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    pq.write_table(pa.table({"report_id": ["a", "b"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"report_id": ["c"]}), folder / "part-1.parquet")
    ids = read_column(tables.locate(str(folder)), "parquet", "report_id")
    assert sorted(ids.to_pylist()) == ["a", "b", "c"]


def test_read_column_jsonl_with_mixed_types(tmp_path):
    # Arrow's JSON reader refuses a whole file when a value changes type between rows; the
    # job must still read it (the bad row goes to the errors table).
    path = tmp_path / "reports.jsonl"
    rows = [{"report_id": "007", "text": TEXT}, {"report_id": 8, "text": 42},
            {"text": "no id here"}, {"report_id": "x9", "text": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loc = tables.locate(str(path))
    assert read_column(loc, "json", "report_id").to_pylist() == ["007", "8", None, "x9"]
    assert read_column(loc, "json", "text").to_pylist() == [TEXT, "42", "no id here", None]


def test_parse_json_lines_keeps_the_type_of_texts():
    lines = [json.dumps({"rid": 5, "body": 42}), "", json.dumps({"rid": "a", "body": "ok"})]
    frame = tables.parse_json_lines(lines, ["rid", "body"], "rid")
    assert frame["rid"].tolist() == ["5", "a"]
    assert frame["body"].tolist() == [42, "ok"]
    assert tables.text_problem(frame["body"][0]).startswith("report text is not text (got int)")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_read_column_missing_column_names_the_flags(tmp_path, fmt):
    frame = pd.DataFrame({"report_id": ["a"], "text": ["t"]})
    path = write_frame(frame, tmp_path / {"csv": "r.csv", "parquet": "r.parquet", "json": "r.jsonl"}[fmt])
    loc = tables.locate(str(path))
    with pytest.raises(KeyError, match="--id-column / --text-column"):
        read_column(loc, fmt, "accession")
    # The driver's check of the text column reads the schema, not the (large) column.
    with pytest.raises(KeyError, match="'accession' not in .*--id-column / --text-column"):
        tables.require_column(loc, fmt, "accession")
    tables.require_column(loc, fmt, "text")


# --- row checks -----------------------------------------------------------------------------

def test_row_key_is_stable_and_follows_text_and_id():
    key = tables.row_key("r1", TEXT)
    assert key == tables.row_key("r1", TEXT)
    assert key.startswith("r1#sha256:") and len(key.split(":")[1]) == 16
    assert tables.row_key("r1", TEXT + " ") != key
    assert tables.row_key("r2", TEXT) != key
    assert tables.row_key(None, TEXT).startswith("#sha256:")
    assert tables.row_key("r1", 42) != tables.row_key("r1", "42")
    assert tables.row_key("r1", None) == tables.row_key("r1", None)


@pytest.mark.parametrize("value, reason", [
    (None, "report text is missing"),
    (float("nan"), "report text is missing"),
    (pd.NA, "report text is missing"),
    (42, "report text is not text (got int)"),
    (3.5, "report text is not text (got float)"),
    ({"a": 1}, "report text is not text (got dict)"),
    ("", "report text is empty"),
    ("   \n\t ", "report text is empty"),
])
def test_text_problem(value, reason):
    assert tables.text_problem(value).startswith(reason)


def test_text_problem_accepts_text():
    assert tables.text_problem(TEXT) is None
    assert tables.text_problem(" x ") is None


@pytest.mark.parametrize("value, expected", [
    ("007", "007"), ("  r-1 \n", "r-1"), (12, "12"), (None, None), (float("nan"), None),
    (pd.NA, None), ("", None), ("   ", None),
])
def test_clean_id(value, expected):
    assert tables.clean_id(value) == expected


# --- writing and reading finished parts -----------------------------------------------------

def _label_table(ids: list[str]) -> pa.Table:
    rows = [{"report_id": i, "condition": "spinal_cancer", "level": None, "score": 0.5}
            for i in ids]
    return pa.Table.from_pylist(rows, schema=tables.LABEL_SCHEMA)


def test_write_table_atomically_leaves_only_the_finished_file(tmp_path):
    loc = tables.locate(str(tmp_path / "out")).child("labels")
    first = tables.write_table_atomically(_label_table(["a", "b"]), loc)
    second = tables.write_table_atomically(_label_table(["c"]), loc)
    files = sorted(p.name for p in (tmp_path / "out" / "labels").iterdir())
    assert files == sorted([first.rsplit("/", 1)[1], second.rsplit("/", 1)[1]])
    assert all(f.startswith("part-") and f.endswith(".parquet") for f in files)
    assert pq.read_table(first).schema.equals(tables.LABEL_SCHEMA)


def test_a_keyed_write_replaces_its_own_file(tmp_path):
    """A batch Ray re-runs writes under the same key: one file, not a duplicate."""
    loc = tables.locate(str(tmp_path / "out")).child("labels")
    first = tables.write_table_atomically(_label_table(["a", "b"]), loc, key="batch-1")
    again = tables.write_table_atomically(_label_table(["a", "b"]), loc, key="batch-1")
    other = tables.write_table_atomically(_label_table(["c"]), loc, key="batch-2")
    assert first == again != other
    assert sorted(tables.read_finished(loc, ["report_id"])["report_id"]) == ["a", "b", "c"]
    assert not [p for p in (tmp_path / "out" / "labels").iterdir() if p.name.startswith(".")]


def test_iter_finished_streams_every_part(tmp_path):
    loc = tables.locate(str(tmp_path)).child("labels")
    tables.write_table_atomically(_label_table(["a", "b"]), loc)
    tables.write_table_atomically(_label_table(["c"]), loc)
    ids = [i for b in tables.iter_finished(loc, ["report_id"]) for i in b["report_id"].to_pylist()]
    assert sorted(ids) == ["a", "b", "c"]
    assert list(tables.iter_finished(tables.locate(str(tmp_path / "none")), ["report_id"])) == []


def test_read_finished_ignores_temporary_and_hidden_files(tmp_path):
    loc = tables.locate(str(tmp_path)).child("labels")
    tables.write_table_atomically(_label_table(["a", "b"]), loc)
    folder = tmp_path / "labels"
    # What a writer killed mid-write leaves behind, and other hidden files.
    pq.write_table(_label_table(["killed"]), folder / ".part-x.parquet.tmp")
    pq.write_table(_label_table(["hidden"]), folder / ".hidden.parquet")
    (folder / "notes.txt").write_text("not a table")
    finished = tables.read_finished(loc, ["report_id", "condition"])
    assert sorted(finished["report_id"]) == ["a", "b"]
    assert list(finished.columns) == ["report_id", "condition"]


def test_read_finished_of_missing_folder_is_empty(tmp_path):
    finished = tables.read_finished(tables.locate(str(tmp_path / "nothing")), ["report_id"])
    assert finished.empty and list(finished.columns) == ["report_id"]


def test_locate_local_and_s3():
    local = tables.locate("out")
    assert local.path.endswith("/out") and local.child("labels").uri == "out/labels"
    remote = tables.locate("s3://bucket/out/", "http://127.0.0.1:9")
    assert remote.path == "bucket/out/"
    assert remote.child("labels").path == "bucket/out/labels"
    assert type(remote.fs).__name__ == "S3FileSystem"


def test_rows_table_refuses_a_row_that_does_not_match_the_columns():
    row = dict.fromkeys(tables.LABEL_SCHEMA.names)
    assert tables.rows_table([row], tables.LABEL_SCHEMA).num_rows == 1
    with pytest.raises(ValueError, match=r"extra \['scroe'\], missing \['score'\]"):
        tables.rows_table([{**{k: v for k, v in row.items() if k != "score"}, "scroe": 0.5}],
                          tables.LABEL_SCHEMA)
