"""Report tables in and label tables out: formats, local or s3:// paths, row checks, atomic writes.

No Ray here: the labelling job calls these from its driver and its actors.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json"}

LABEL_SCHEMA = pa.schema([
    ("report_id", pa.string()), ("condition", pa.string()), ("level", pa.string()),
    ("method", pa.string()), ("score", pa.float64()), ("label", pa.bool_()),
    ("threshold", pa.float64()), ("summary", pa.string()), ("truncated", pa.bool_()),
    ("model", pa.string()), ("engine", pa.string()), ("definition_hash", pa.string()),
    ("prompt_hash", pa.string()), ("calibration_id", pa.string()), ("code_version", pa.string()),
    ("labelled_at", pa.string()),
])
ERROR_SCHEMA = pa.schema([
    ("row_key", pa.string()), ("report_id", pa.string()), ("condition", pa.string()),
    ("reason", pa.string()), ("text_preview", pa.string()), ("recorded_at", pa.string()),
])


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
            raise ValueError(f"format {explicit!r} is not one of {sorted(set(FORMATS.values()))}")
        return explicit
    suffix = PurePosixPath(uri.rstrip("/")).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"cannot tell the format of {uri!r} from its extension; pass --input-format "
            f"(one of {sorted(set(FORMATS.values()))})"
        )
    return FORMATS[suffix]


def csv_convert_options(columns: list[str]) -> pacsv.ConvertOptions:
    """Read ids and texts as strings: inferring types would turn '007' into 7."""
    return pacsv.ConvertOptions(column_types={c: pa.string() for c in columns})


def read_column(loc: TableLocation, fmt: str, column: str) -> pa.ChunkedArray:
    """One column of the whole input, as strings (the driver's cheap pass over ids)."""
    file_format: str | pads.FileFormat = fmt
    if fmt == "csv":
        file_format = pads.CsvFileFormat(convert_options=csv_convert_options([column]))
    dataset = pads.dataset(loc.path, format=file_format, filesystem=loc.fs)
    if column not in dataset.schema.names:
        raise KeyError(
            f"column {column!r} not in {loc.uri} (columns: {dataset.schema.names}); "
            "set --id-column / --text-column"
        )
    return dataset.to_table(columns=[column]).column(column).cast(pa.string())


def duplicated_ids(ids: pa.ChunkedArray) -> dict[str, int]:
    """Ids that occur more than once, with their counts."""
    counts = pd.Series(ids.to_pandas()).dropna().value_counts()
    return {str(k): int(v) for k, v in counts[counts > 1].items()}


def row_key(report_id: str | None, text: object) -> str:
    """Stable key of an input row: its id and a hash of its text, so a row that the user fixes
    (new text, or a new id) is checked again on the next run instead of being skipped."""
    digest = hashlib.sha256(repr(text).encode()).hexdigest()[:16]
    return f"{report_id or ''}#sha256:{digest}"


def clean_id(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def text_problem(value: object) -> str | None:
    """Why a report text cannot be labelled, or None when it can."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "report text is missing"
    if not isinstance(value, str):
        return f"report text is not text (got {type(value).__name__}); check --text-column"
    if not value.strip():
        return "report text is empty"
    return None


def write_table_atomically(table: pa.Table, loc: TableLocation, prefix: str = "part") -> str:
    """Write one Parquet file that readers either see whole or not at all.

    Local files are written under a hidden temporary name and renamed; S3 objects only appear
    when their upload completes, so they are written in place.
    """
    loc.fs.create_dir(loc.path, recursive=True)
    name = f"{prefix}-{uuid.uuid4().hex}.parquet"
    final = f"{loc.path}/{name}"
    if isinstance(loc.fs, pafs.LocalFileSystem):
        temp = f"{loc.path}/.{name}.tmp"
        pq.write_table(table, temp, filesystem=loc.fs)
        loc.fs.move(temp, final)
    else:
        pq.write_table(table, final, filesystem=loc.fs)
    return final


def read_finished(loc: TableLocation, columns: list[str]) -> pd.DataFrame:
    """Columns of every finished Parquet part under `loc` (temporary files are ignored)."""
    try:
        info = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return pd.DataFrame(columns=columns)
    parts = [f.path for f in info if f.is_file and f.base_name.endswith(".parquet")
             and not f.base_name.startswith(".")]
    if not parts:
        return pd.DataFrame(columns=columns)
    frames = [pq.read_table(p, columns=columns, filesystem=loc.fs).to_pandas() for p in parts]
    return pd.concat(frames, ignore_index=True)
