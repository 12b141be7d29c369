"""What a labelling run still has to do, in memory that grows far slower than the archive.

A rerun skips every (report, condition) already labelled and every input row already in the
errors table. Held as Python sets of strings, those keys cost ~200 bytes each (1.5 GB for 5M
reports x 3 conditions half done) and were copied into every engine actor. Here each key is two
64-bit hashes in sorted numpy arrays (16 bytes a key, 128 bits: a false match is about as
likely as a disk's silent bit flip), built by streaming the finished tables on the driver, put
once in Ray's object store (read zero-copy) and consulted by the cheap planning step that runs
in the read tasks: engine actors receive only the rows and conditions still to do.

No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_app.pipeline import report_tables as tables

# Two independent keys for pandas' (stable, process-independent) SipHash: 128 bits per key.
_HASH_KEYS = ("ray_app-resume-1", "ray_app-resume-2")
TODO_COLUMN = "_todo"  # conditions still to label for the row, joined by TODO_SEP
DUPLICATES_COLUMN = "_id_count"  # >1: the id occurs that many times in the input
TODO_SEP = "\n"


def key_hashes(*columns: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 hashes per row of the given key columns (strings)."""
    frame = pd.DataFrame({i: pd.Series(c, dtype=object) for i, c in enumerate(columns)})
    return tuple(pd.util.hash_pandas_object(frame, index=False, hash_key=k).to_numpy()
                 for k in _HASH_KEYS)


@dataclass
class KeyIndex:
    """A set of keys as sorted hash pairs; `contains` answers for a whole batch at once."""

    first: np.ndarray
    second: np.ndarray

    @classmethod
    def build(cls, parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> "KeyIndex":
        pairs = list(parts)
        first = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.uint64)
        second = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.uint64)
        order = np.lexsort((second, first))
        first, second = first[order], second[order]
        repeat = np.zeros(len(first), dtype=bool)  # a key seen before (one row per level)
        repeat[1:] = (first[1:] == first[:-1]) & (second[1:] == second[:-1])
        return cls(first[~repeat], second[~repeat])

    def __len__(self) -> int:
        return len(self.first)

    def contains(self, *columns: Sequence) -> np.ndarray:
        if not len(self.first) or not len(columns[0]):
            return np.zeros(len(columns[0]), dtype=bool)
        first, second = key_hashes(*columns)
        left = np.searchsorted(self.first, first, "left")
        right = np.searchsorted(self.first, first, "right")
        found = (right - left == 1) & (self.second[np.minimum(left, len(self.second) - 1)] == second)
        for i in np.flatnonzero(right - left > 1):  # equal first hashes: compare the second ones
            found[i] = bool((self.second[left[i]:right[i]] == second[i]).any())
        return found


@dataclass
class ResumeState:
    """What is finished in an output folder, and which input ids are duplicated."""

    done: KeyIndex  # (report_id, condition)
    errored: KeyIndex  # row keys of input rows already in the errors table
    duplicates: dict[str, int]

    @property
    def done_pairs(self) -> int:
        return len(self.done)


def finished_state(out: tables.TableLocation) -> ResumeState:
    """Stream the labels and errors tables of `out` into hash indexes (duplicates: none yet;
    `scan_ids` finds them)."""
    labels = tables.iter_finished(out.child("labels"), ["report_id", "condition"])
    done = KeyIndex.build(key_hashes(b["report_id"].to_pylist(), b["condition"].to_pylist())
                          for b in labels)
    errors = tables.iter_finished(out.child("errors"), ["row_key", "condition"])
    errored = KeyIndex.build(key_hashes(_row_errors(b)) for b in errors)
    return ResumeState(done, errored, {})


def _row_errors(batch: pa.RecordBatch) -> list[str]:
    """Row keys of errors about a whole input row (condition-level errors are retried)."""
    conditions = batch["condition"].to_pylist()
    return [k for k, c in zip(batch["row_key"].to_pylist(), conditions) if c is None]


@dataclass
class IdScan:
    """The driver's pass over the input's id column."""

    rows: int
    missing_ids: int
    duplicates: dict[str, int]  # ids that occur more than once, with their counts
    pairs_to_do: int  # (id, condition) pairs not yet labelled


def scan_ids(read_ids: Callable[[], Iterable[pa.Array]], conditions: Sequence[str],
             done: KeyIndex) -> IdScan:
    """Count rows, missing ids, duplicated ids and pairs still to do, holding 8 bytes per row:
    ids are hashed batch by batch, and only ids whose hash repeats are counted exactly, in a
    second pass that happens only when there are some."""
    hashes, rows, missing, to_do = [], 0, 0, 0
    for batch in read_ids():
        ids = _clean_ids(batch)
        present = [i for i in ids if i is not None]
        rows, missing = rows + len(ids), missing + len(ids) - len(present)
        hashes.append(key_hashes(present)[0])
        to_do += sum(int((~done.contains(present, [n] * len(present))).sum()) for n in conditions)
    values, counts = np.unique(np.concatenate(hashes or [np.zeros(0, np.uint64)]),
                               return_counts=True)
    repeated = values[counts > 1]
    duplicates = _exact_counts(read_ids(), repeated) if len(repeated) else {}
    return IdScan(rows, missing, duplicates, to_do)


def _exact_counts(id_batches: Iterable[pa.Array], candidates: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in id_batches:
        present = [i for i in _clean_ids(batch) if i is not None]
        for i in np.flatnonzero(np.isin(key_hashes(present)[0], candidates)):
            counts[present[i]] = counts.get(present[i], 0) + 1
    return {k: v for k, v in counts.items() if v > 1}


def _clean_ids(batch: pa.Array) -> list[str | None]:
    return [tables.clean_id(v) for v in batch.to_pylist()]


def plan_batch(batch: pd.DataFrame, id_column: str, text_column: str,
               conditions: Sequence[str], state: ResumeState) -> pd.DataFrame:
    """The rows of a batch that still need work, each with the conditions still to label
    (TODO_COLUMN) and its id's count in the input (DUPLICATES_COLUMN); finished rows and
    rows already in the errors table are dropped."""
    ids = [tables.clean_id(v) for v in batch[id_column]]
    texts = list(batch[text_column])
    keys = [tables.row_key(i, t) for i, t in zip(ids, texts)]
    keep = ~state.errored.contains(keys)
    usable = [i or "" for i in ids]
    done = [state.done.contains(usable, [name] * len(ids)) for name in conditions]
    todo = [TODO_SEP.join(n for n, d in zip(conditions, row_done) if not d)
            for row_done in zip(*done)] if done else [""] * len(ids)
    counts = [state.duplicates.get(i, 1) if i is not None else 1 for i in ids]
    problems = [p if isinstance(p, str) else None  # a missing value may come back as NaN
                for p in (batch[tables.PROBLEM_COLUMN] if tables.PROBLEM_COLUMN in batch
                          else [None] * len(ids))]
    # A row without an id, with a duplicated one, or unreadable goes to the actor to be reported.
    keep &= np.array([bool(t) or i is None or c > 1 or bool(p)
                      for t, i, c, p in zip(todo, ids, counts, problems)], dtype=bool)
    planned = pd.DataFrame({id_column: pd.Series(list(batch[id_column]), dtype=object),
                            text_column: pd.Series(texts, dtype=object),
                            TODO_COLUMN: todo, DUPLICATES_COLUMN: counts,
                            tables.PROBLEM_COLUMN: pd.Series(problems, dtype=object)})
    return planned[keep].reset_index(drop=True)
