"""Report tables in and label tables out: formats, local or s3:// paths, row checks, atomic writes.

No Ray here: the labelling job calls these from its driver and its actors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_app.pipeline.cli import ColumnError, InputError, one_line
from ray_app.provenance import utc_now

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json"}

LABEL_SCHEMA = pa.schema([
    ("report_id", pa.string()), ("condition", pa.string()), ("level", pa.string()),
    ("method", pa.string()), ("score", pa.float64()), ("label", pa.bool_()),
    ("threshold", pa.float64()), ("uncertain", pa.bool_()), ("summary", pa.string()),
    ("evidence", pa.string()), ("truncated", pa.bool_()),
    ("model", pa.string()), ("engine", pa.string()), ("definition_hash", pa.string()),
    ("prompt_hash", pa.string()), ("calibration_id", pa.string()), ("code_version", pa.string()),
    ("labelled_at", pa.string()),
])
ERROR_SCHEMA = pa.schema([
    ("row_key", pa.string()), ("report_id", pa.string()), ("condition", pa.string()),
    ("reason", pa.string()), ("text_preview", pa.string()), ("recorded_at", pa.string()),
])


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows as a table of `schema`, refusing a row whose keys are not the schema's columns
    (Arrow would silently drop a key the schema lacks, losing a field nobody sees missing)."""
    names = set(schema.names)
    for row in rows:
        if set(row) != names:
            raise ValueError(f"row keys differ from the table's columns: extra "
                             f"{sorted(set(row) - names)}, missing {sorted(names - set(row))}")
    return pa.Table.from_pylist(rows, schema=schema)


@dataclass(frozen=True)
class TableLocation:
    """A path (file or folder) on a filesystem; `uri` is what the user typed."""

    uri: str
    fs: pafs.FileSystem
    path: str

    def child(self, name: str) -> "TableLocation":
        return TableLocation(f"{self.uri.rstrip('/')}/{name}", self.fs, f"{self.path.rstrip('/')}/{name}")


def locate(uri: str, s3_endpoint: str | None = None) -> TableLocation:
    """Filesystem and path for a local path or an s3:// URI (credentials from the usual AWS
    environment variables; `s3_endpoint` for S3-compatible stores such as MinIO)."""
    if uri.startswith("s3://"):
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"endpoint_override": endpoint} if endpoint else {}
        if endpoint and endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        fs = pafs.S3FileSystem(region=region or "us-east-1", **kwargs)
        return TableLocation(uri, fs, uri[len("s3://"):])
    return TableLocation(uri, pafs.LocalFileSystem(), os.path.abspath(uri))


def table_format(uri: str, explicit: str | None = None) -> str:
    if explicit:
        if explicit not in set(FORMATS.values()):
            raise InputError(f"format {explicit!r} is not one of {sorted(set(FORMATS.values()))}")
        return explicit
    suffix = PurePosixPath(uri.rstrip("/")).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"cannot tell the format of {uri!r} from its extension; pass --input-format "
            f"(one of {sorted(set(FORMATS.values()))})"
        )
    return FORMATS[suffix]


def csv_convert_options(columns: list[str], binary: bool = False) -> pacsv.ConvertOptions:
    """Read ids and texts as strings: inferring types would turn '007' into 7. `binary` reads
    their bytes instead, for `decode_rows`: Arrow refuses a whole file over one byte that is
    not UTF-8, where only that row should go to the errors table."""
    return pacsv.ConvertOptions(column_types={c: pa.binary() if binary else pa.string()
                                              for c in columns})


def csv_parse_options() -> pacsv.ParseOptions:
    """Report texts span lines inside quotes; without this Arrow's chunker splits a quoted value
    at a block boundary and fails on any CSV larger than one block (~1 MB)."""
    return pacsv.ParseOptions(newlines_in_values=True)


def input_files(loc: TableLocation) -> list[str]:
    """The file, or the files under a folder (names starting with '.' or '_' left out, as
    Arrow datasets do)."""
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {loc.uri} does not exist; check the path"
                                + (" (and --s3-endpoint)" if loc.uri.startswith("s3://") else ""))
    if info.is_file:
        return [loc.path]
    found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return sorted(f.path for f in found if f.is_file
                  and not any(part.startswith((".", "_"))
                              for part in f.path[len(loc.path):].split("/") if part))


PROBLEM_COLUMN = "_problem"  # why an input row cannot be labelled, found while reading it
ENCODING_HINT = "if the whole file is in another encoding, pass --encoding (cp1252, latin-1)"


def parse_json_lines(lines: list[str | bytes], columns: list[str], id_column: str,
                     where: str = "", encoding: str = "utf-8") -> pd.DataFrame:
    """JSON Lines parsed in Python, not by Arrow: Arrow refuses a whole file when one row's
    value has another type (a number for a text) or one line is not JSON, where that row should
    go to the errors table. Ids become strings (as iter_column gives them); other values keep
    their JSON type, so a non-string text is reported as such; a missing key is None. A line
    that cannot be read becomes a row without id or text whose PROBLEM_COLUMN says why (line
    number, in `where`, and what to do); blank lines are skipped."""
    records = []
    for number, line in enumerate(lines, 1):
        record, problem = _parse_line(line, f"line {number}{where}", encoding)
        if record is not None or problem:
            records.append([(record or {}).get(c) for c in columns] + [problem])
    frame = pd.DataFrame(records, columns=[*columns, PROBLEM_COLUMN], dtype=object)
    if id_column in frame:
        frame[id_column] = pd.Series(_id_strings(frame[id_column]), dtype=object, index=frame.index)
    return frame


def parse_json_file(data: bytes, path: str, columns: list[str], id_column: str,
                    encoding: str = "utf-8") -> pd.DataFrame:
    """One JSON Lines file's bytes as parse_json_lines rows (bytes are decoded line by line,
    so one line in another encoding costs only that line)."""
    return parse_json_lines(data.splitlines(), columns, id_column, f" of {path}", encoding)


def decode_rows(frame: pd.DataFrame, id_column: str, text_column: str,
                encoding: str = "utf-8") -> pd.DataFrame:
    """Ids and texts read as bytes (csv_convert_options(binary=True)) decoded in `encoding`.
    Ids always decode (an undecodable byte is kept as an escape, the same on every pass); a
    text that does not is kept with escapes and gets a PROBLEM_COLUMN reason."""
    ids = [_decode(v, encoding, "backslashreplace") for v in frame[id_column]]
    texts, problems = [], []
    for report_id, raw in zip(ids, frame[text_column]):
        try:
            texts.append(_decode(raw, encoding, "strict"))
            problems.append(None)
        except UnicodeDecodeError as err:
            texts.append(raw.decode(encoding, "backslashreplace"))  # str: one type per column
            problems.append(f"text of report {report_id} is not valid {encoding} ({err.reason}: "
                            f"{raw[err.start:err.end]!r} at byte {err.start}); {ENCODING_HINT}")
    return pd.DataFrame({id_column: pd.Series(ids, dtype=object),
                         text_column: pd.Series(texts, dtype=object),
                         PROBLEM_COLUMN: pd.Series(problems, dtype=object)})


def _decode(value: object, encoding: str, errors: str) -> object:
    return value.decode(encoding, errors) if isinstance(value, bytes) else value


def iter_column(loc: TableLocation, fmt: str, column: str,
                encoding: str = "utf-8") -> Iterator[pa.Array]:
    """One column of the whole input as string arrays, batch by batch (the driver's cheap
    pass over ids: it never holds the whole column). CSV values are decoded as decode_rows
    decodes ids, so that both passes see the same id."""
    if fmt == "json":
        values = [r.get(column) for r in _json_records(loc, encoding)]
        if all(_missing(v) for v in values):
            raise ColumnError(_no_column(loc, column, None))
        yield pa.array(_id_strings(values), type=pa.string())
        return
    for batch in _arrow_dataset(loc, fmt, column).to_batches(columns=[column]):
        values = batch.column(0)
        if fmt == "csv":
            values = pa.array([_decode(v, encoding, "backslashreplace")
                               for v in values.to_pylist()], type=pa.string())
        yield values.cast(pa.string())


def require_column(loc: TableLocation, fmt: str, column: str, encoding: str = "utf-8") -> None:
    """Fail fast on a missing, empty or binary input (check_input) or a wrong column name
    without reading the column (the schema; for JSON Lines, the rows up to the first that has
    the key)."""
    check_input(loc, fmt)
    if fmt == "json":
        if not any(not _missing(r.get(column)) for r in _json_records(loc, encoding)):
            raise ColumnError(_no_column(loc, column, None))
    else:
        with _s3_errors(loc):
            _arrow_dataset(loc, fmt, column)


_SNIFF_BYTES = 8192


def check_input(loc: TableLocation, fmt: str) -> None:
    """Refuse, with what to do, an input that does not exist, an empty file or folder, a binary
    file given as CSV / JSON Lines (a NUL byte in its first 8 KB), or a Parquet file that is not
    one. Looks at the first file of a folder only."""
    with _s3_errors(loc):
        files = input_files(loc)
        if not files:
            raise InputError(f"input folder {loc.uri} holds no files (names starting with '.' "
                             "or '_' are skipped); check the path")
        name = loc.uri if files[0] == loc.path else files[0]
        with loc.fs.open_input_stream(files[0]) as f:
            head = f.read(_SNIFF_BYTES)
    if not head:
        raise InputError(f"input {name} is empty (0 bytes); check the path")
    if fmt in ("csv", "json") and b"\0" in head:
        kind, at = ("CSV" if fmt == "csv" else "JSON Lines"), head.index(b"\0")
        raise InputError(f"input {name} is not a {kind} text file: it holds binary data (a NUL "
                         f"byte at byte {at}); pass a CSV, Parquet or JSON Lines "
                         "file (UTF-16 text: save it as UTF-8) or set --input-format")
    if fmt == "parquet" and not head.startswith(b"PAR1"):
        raise InputError(f"input {name} is not a Parquet file (no PAR1 header); check the path "
                         "or set --input-format")


@contextmanager
def _s3_errors(loc: TableLocation):
    """S3 failures (an endpoint that does not answer, refused credentials) as one clear
    InputError instead of the AWS SDK's OSError."""
    try:
        yield
    except OSError as err:
        if isinstance(loc.fs, pafs.S3FileSystem) and "AWS Error" in str(err):
            raise s3_problem(loc, err) from err
        raise


def s3_problem(loc: TableLocation, err: OSError) -> InputError:
    text = str(err)
    reason = one_line(text.split("AWS Error ", 1)[-1], 300)
    endpoint = _s3_endpoint_name(loc.fs)
    what = (f"cannot reach S3 endpoint {endpoint}" if "NETWORK_CONNECTION" in text
            else f"S3 endpoint {endpoint} refused {loc.uri}")
    return InputError(f"{what}: {reason}; check --s3-endpoint and the AWS credentials "
                      "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")


def _s3_endpoint_name(fs: pafs.FileSystem) -> str:
    try:  # pyarrow exposes the settings only through pickling
        settings = fs.__reduce__()[1][0]
        return settings.get("endpoint_override") or f"AWS S3 ({settings.get('region')})"
    except Exception:  # noqa: BLE001 - only for the message
        return "AWS S3"


def _arrow_dataset(loc: TableLocation, fmt: str, column: str) -> pads.Dataset:
    file_format: str | pads.FileFormat = fmt
    if fmt == "csv":
        file_format = pads.CsvFileFormat(parse_options=csv_parse_options(),
                                         convert_options=csv_convert_options([column], binary=True))
    try:
        dataset = pads.dataset(loc.path, format=file_format, filesystem=loc.fs)
    except pa.ArrowInvalid as err:  # not a table of this format (empty, binary, malformed)
        reason = one_line(str(err).split("Invalid: ")[-1], 200)
        raise InputError(f"cannot read {loc.uri} as {fmt}: {reason}; check the file or set "
                         "--input-format") from err
    if column not in dataset.schema.names:
        raise ColumnError(_no_column(loc, column, dataset.schema.names))
    return dataset


def _no_column(loc: TableLocation, column: str, names: list[str] | None) -> str:
    where = f"{loc.uri} (columns: {names})" if names is not None else f"any row of {loc.uri}"
    return f"column {column!r} not in {where}; set --id-column / --text-column"


def _json_records(loc: TableLocation, encoding: str = "utf-8"):
    """The JSON Lines rows of every input file, parsed as parse_json_lines does; a line that
    cannot be read is an empty row here (the actors report why)."""
    for path in input_files(loc):
        with loc.fs.open_input_stream(path) as f:
            lines = f.read().splitlines()
        for line in lines:
            record, problem = _parse_line(line, "", encoding)
            if record is not None or problem:
                yield record or {}


def _parse_line(line: str | bytes, where: str, encoding: str) -> tuple[dict | None, str | None]:
    """One JSON Lines row and why it cannot be read: (None, None) for a blank line."""
    if isinstance(line, bytes):
        try:
            line = line.decode(encoding)
        except UnicodeDecodeError as err:
            return None, (f"{where} is not valid {encoding} ({err.reason} at byte {err.start}); "
                          f"{ENCODING_HINT}")
    if not line.strip():
        return None, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, (f"{where} is not JSON ({err.msg} at column {err.colno}): "
                      f"{line[:60]!r}; fix or remove that line and rerun")
    if not isinstance(record, dict):
        return None, f"{where} is not a JSON object ({line[:60]!r}); each line must be one report"
    return record, None


def row_key(report_id: str | None, text: object) -> str:
    """Stable key of an input row: its id and a hash of its text, so a row that the user fixes
    (new text, or a new id) is checked again on the next run instead of being skipped."""
    digest = hashlib.sha256(repr(text).encode()).hexdigest()[:16]
    return f"{report_id or ''}#sha256:{digest}"


def _id_strings(values) -> list[str | None]:
    """Ids as strings whatever their JSON type (7 and "7" are the same id); missing as None."""
    return [None if _missing(v) else str(v) for v in values]


def _missing(value: object) -> bool:
    """None, NaN, or pandas' NA (what string[pyarrow] columns in Ray batches hold for nulls)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def clean_id(value: object) -> str | None:
    if _missing(value):
        return None
    text = str(value).strip()
    return text or None


def text_problem(value: object) -> str | None:
    """Why a report text cannot be labelled, or None when it can."""
    if _missing(value):
        return "report text is missing"
    if not isinstance(value, str):
        return f"report text is not text (got {type(value).__name__}); check --text-column"
    if not value.strip():
        return "report text is empty"
    return None


def write_table_atomically(table: pa.Table, loc: TableLocation, prefix: str = "part",
                           key: str | None = None) -> str:
    """Write one Parquet file that readers either see whole or not at all.

    `key` names the file after the work it holds (a batch's row keys, say): when Ray re-runs a
    batch whose first run wrote its file but died before returning, the second run replaces
    that file instead of adding a duplicate. Without a key the name is random.
    Local files are written under a hidden temporary name and renamed; S3 objects only appear
    when their upload completes, so they are written in place.
    """
    loc.fs.create_dir(loc.path, recursive=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32] if key is not None else uuid.uuid4().hex
    name = f"{prefix}-{digest}.parquet"
    final = f"{loc.path}/{name}"
    if isinstance(loc.fs, pafs.LocalFileSystem):
        temp = f"{loc.path}/.{name}.{uuid.uuid4().hex}.tmp"  # two runs of one batch may overlap
        pq.write_table(table, temp, filesystem=loc.fs)
        loc.fs.move(temp, final)
    else:
        pq.write_table(table, final, filesystem=loc.fs)
    return final


def read_manifest(out: TableLocation) -> dict | None:
    """The manifest.json a job left in its output folder, or None for a new folder."""
    try:
        with out.fs.open_input_stream(out.child("manifest.json").path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def write_manifest(out: TableLocation, manifest: dict) -> None:
    """Record what an output folder's rows were made with, stamped with the time (the first
    write to an output folder: one that cannot be created is refused here, before any work)."""
    try:
        with _s3_errors(out):
            out.fs.create_dir(out.path, recursive=True)
            with out.fs.open_output_stream(out.child("manifest.json").path) as f:
                f.write(json.dumps({**manifest, "updated_at": utc_now()}, indent=2).encode())
    except OSError as err:
        detail = re.search(r"Detail: \[errno \d+\] (.*)", str(err))
        reason = detail.group(1) if detail else (err.strerror or str(err))
        raise InputError(f"cannot create output folder {out.uri}: {one_line(reason, 200)}; check "
                         "--output (a folder you can write to, local or s3://)") from err


def read_finished(loc: TableLocation, columns: list[str] | None) -> pd.DataFrame:
    """Columns of every finished Parquet part under `loc` (temporary files are ignored)."""
    parts = _finished_parts(loc)
    if not parts:
        return pd.DataFrame(columns=columns)
    frames = [pq.read_table(p, columns=columns, filesystem=loc.fs).to_pandas() for p in parts]
    return pd.concat(frames, ignore_index=True)


def iter_finished(loc: TableLocation, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The same, batch by batch: memory for one batch, however many rows are finished."""
    for path in _finished_parts(loc):
        yield from pq.ParquetFile(loc.fs.open_input_file(path)).iter_batches(columns=columns)


def _finished_parts(loc: TableLocation) -> list[str]:
    try:
        info = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    return sorted(f.path for f in info if f.is_file and f.base_name.endswith(".parquet")
                  and not f.base_name.startswith("."))


def read_label_rows(uri: str, s3_endpoint: str | None = None) -> pd.DataFrame:
    """Every label row of a labelling job: `uri` is the job's output folder (with labels/ in
    it) or a folder of label Parquet parts."""
    loc = locate(uri, s3_endpoint)
    labels = loc.child("labels")
    with _s3_errors(loc):
        if loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"label folder {uri} does not exist: pass the output folder "
                                    "of jobs/label_reports.py")
        if loc.fs.get_file_info(labels.path).type == pafs.FileType.Directory:
            loc = labels
    rows = read_finished(loc, None)
    if rows.empty:
        raise FileNotFoundError(f"no label rows under {uri}: pass the output folder of "
                                "jobs/label_reports.py")
    return rows
