"""Few-shot examples picked per report (`few_shot: auto` in a condition) from an example pool.

The pool is a reports table and the hand labels of those reports (the "examples" part of the
hand-labelled reports, scripts/split_labels.py). For each report and condition the labeller
shows the k pool reports nearest to it by TF-IDF cosine similarity, k/2 labelled 'yes' and
k/2 'no', never the report itself (same id, or the same text as the model would see it), the
most similar last (nearest to the question). Results were found sensitive to hand-chosen
examples; retrieval takes the choice out of anyone's hands, and it is deterministic: the same
pool gives the same examples for the same report.

The pool's identity (a hash of its report ids, texts and labels per condition, and of the
retrieval settings) goes into the condition's definition hash (`bind_pool`), so every label row,
the output folder's manifest and any calibration record which pool made the scores: a run is not
resumed, nor a calibration applied, with another pool. The manifest also lists each condition's
example report ids, and jobs/calibrate.py / jobs/evaluate.py leave those reports' hand labels out
(`drop_example_reports`): a threshold must not be chosen on the reports shown as examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ray_app.labelling.conditions import Condition, FewShotExample
from ray_app.labelling.sections import drop_sections
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.cli import InputError

log = logging.getLogger(__name__)

# Part of every pool identity: changing how examples are retrieved changes the scores.
RETRIEVAL = "tfidf-cosine:char_wb-3-5gram,sublinear-tf:v1"
MANIFEST_KEY = "few_shot_examples"  # in a label job's manifest.json, per condition
_ANSWER = {1: "yes", 0: "no"}


class FewShotError(InputError):
    """An example pool that is missing, cannot be read, or cannot serve a condition."""


@dataclasses.dataclass
class _Index:
    ids: np.ndarray  # sorted report ids
    labels: np.ndarray  # 0/1 per pool report, in `ids` order
    texts: list[str]  # as shown: the condition's sections dropped
    normalised: np.ndarray  # whitespace-collapsed `texts`, to find the report itself
    vectorizer: object
    matrix: object  # L2-normalised TF-IDF rows


class ExamplePool:
    """Labelled reports to pick few-shot examples from; plain Python, picklable (the label job
    loads it once on the driver and ships it to its actors; indexes are rebuilt there)."""

    def __init__(self, reports: pd.DataFrame, truth: pd.DataFrame, source: str = "example pool"):
        """`reports`: report_id, text. `truth`: report_id, condition, level, label (0/1); only
        report-level labels (empty level) are used, since examples ask the overall question."""
        self.source = source
        self._texts = _report_texts(reports, source)
        truth = truth.assign(level=truth["level"].fillna("").astype(str),
                             report_id=truth["report_id"].astype(str).str.strip())
        truth = truth[truth["level"] == ""]
        known = truth["report_id"].isin(list(self._texts))
        if not known.all():
            missing = truth.loc[~known, "report_id"].unique()
            log.warning("%s: %d hand-labelled report(s) are not in the reports table (e.g. %s); "
                        "they cannot be examples", source, len(missing), ", ".join(missing[:3]))
        self._labels: dict[str, list[tuple[str, int]]] = {
            str(condition): sorted(zip(group["report_id"], group["label"].astype(int)))
            for condition, group in truth[known].groupby("condition", sort=True)
        }
        self._indexes: dict[tuple, _Index] = {}
        self._warned: set[tuple] = set()

    def __getstate__(self) -> dict:  # ship the data, not the indexes (rebuilt where used)
        return {**self.__dict__, "_indexes": {}, "_warned": set()}

    @property
    def conditions(self) -> list[str]:
        return list(self._labels)

    def report_ids(self, condition: str) -> list[str]:
        """The reports that can be examples for `condition` (sorted)."""
        return [report_id for report_id, _ in self._labels.get(condition, [])]

    def counts(self, condition: str) -> dict[str, int]:
        labels = [label for _, label in self._labels.get(condition, [])]
        return {"yes": sum(labels), "no": len(labels) - sum(labels)}

    def identity(self, condition: str) -> str:
        """Hash of what this pool can show for `condition`: ids, texts, labels, retrieval."""
        rows = [[report_id, _text_hash(self._texts[report_id]), label]
                for report_id, label in self._labels.get(condition, [])]
        payload = json.dumps({"retrieval": RETRIEVAL, "rows": rows})
        return "pool-" + hashlib.sha256(payload.encode()).hexdigest()[:12]

    def check(self, conditions: Iterable[Condition]) -> None:
        """Refuse a condition the pool has no labelled report for; warn where a class has fewer
        than k/2 examples (those prompts show fewer examples of it)."""
        for condition in conditions:
            if not condition.few_shot_auto:
                continue
            counts = self.counts(condition.name)
            if not sum(counts.values()):
                raise FewShotError(
                    f"{self.source} has no report-level hand labels for condition "
                    f"{condition.name!r} (labelled: {self.conditions or 'none'}); add labels "
                    "for it to the pool's truth table or remove 'few_shot: auto' from it")
            for answer, n in counts.items():
                if n < condition.few_shot_k // 2:
                    log.warning("%s: only %d '%s' example(s) for %s, so its prompts show fewer "
                                "than the %d asked for", self.source, n, answer, condition.name,
                                condition.few_shot_k // 2)

    def nearest(self, condition: Condition, report_id: str | None,
                report: str) -> tuple[FewShotExample, ...]:
        """The condition's `few_shot_k` examples for one report: the k/2 most similar 'yes' and
        k/2 most similar 'no' pool reports, least similar first. `report` is the text as the
        model sees it (its condition's sections dropped). Ties go to the smaller report id."""
        index = self._index(condition)
        query = index.vectorizer.transform([report]).toarray().ravel()
        similarity = np.round(index.matrix @ query, 12)  # cosine: the rows are L2-normalised
        allowed = (index.ids != report_id) & (index.normalised != _normalise(report))
        half = condition.few_shot_k // 2
        chosen: list[int] = []
        for label in (1, 0):
            candidates = np.flatnonzero(allowed & (index.labels == label))
            ranked = candidates[np.lexsort((candidates, -similarity[candidates]))]
            chosen += ranked[:half].tolist()
            if len(ranked) < half:
                self._warn_once((condition.name, label),
                                "%s: %d '%s' example(s) available for %s (%d asked for); its "
                                "prompts show fewer", self.source, len(ranked), _ANSWER[label],
                                condition.name, half)
        chosen.sort(key=lambda i: (similarity[i], -i))  # least similar first, nearest last
        return tuple(FewShotExample(index.texts[i], _ANSWER[int(index.labels[i])])
                     for i in chosen)

    def _index(self, condition: Condition) -> _Index:
        key = (condition.name, tuple(sorted(condition.drop_sections)))
        if key not in self._indexes:
            from sklearn.feature_extraction.text import TfidfVectorizer

            rows = self._labels.get(condition.name)
            if not rows:
                raise FewShotError(f"{self.source} has no report-level hand labels for "
                                   f"condition {condition.name!r}")
            ids = [report_id for report_id, _ in rows]
            texts = [drop_sections(self._texts[i], condition.drop_sections) for i in ids]
            # Character 3-5-grams within words: "effusions" is near "effusion", and on Open-i
            # they rank the right class's nearest example first more often than words do.
            vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5),
                                         sublinear_tf=True)
            try:
                matrix = vectorizer.fit_transform(texts)
            except ValueError as err:  # no word in any text
                raise FewShotError(f"{self.source}: cannot index the reports of "
                                   f"{condition.name}: {err}") from err
            self._indexes[key] = _Index(
                np.array(ids, dtype=object), np.array([label for _, label in rows]), texts,
                np.array([_normalise(t) for t in texts], dtype=object), vectorizer, matrix)
        return self._indexes[key]

    def _warn_once(self, key: tuple, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


def _report_texts(reports: pd.DataFrame, source: str) -> dict[str, str]:
    texts: dict[str, str] = {}
    duplicated: set[str] = set()
    unusable = 0
    for raw_id, text in zip(reports["report_id"], reports["text"]):
        report_id = tables.clean_id(raw_id)
        if report_id is None or tables.text_problem(text):
            unusable += 1
            continue
        if report_id in texts:
            duplicated.add(report_id)
        texts[report_id] = text
    if duplicated:
        raise FewShotError(f"{source}: report ids {sorted(duplicated)[:5]} appear more than once; "
                           "an example pool needs unique ids")
    if unusable:
        log.warning("%s: %d row(s) without an id or a text left out", source, unusable)
    return texts


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- setting a pool up: the label job and the Serve app ----------------------------------

def pool_users(conditions: Sequence[Condition], method: str) -> list[str]:
    """Conditions that need an example pool: `few_shot: auto` with the direct method (the
    summary method shows no worked examples; the rule baseline none at all)."""
    return [c.name for c in conditions if c.few_shot_auto] if method == "direct" else []


def check_pool_args(conditions: Sequence[Condition], method: str, reports: str | None,
                    truth: str | None) -> bool:
    """Whether a pool is needed; refuse one that is needed and missing, half given, or given
    for nothing (a pool that changes no prompt would still be taken for part of the setup)."""
    users = pool_users(conditions, method)
    if not users:
        if reports or truth:
            which = "" if method == "direct" else " with the direct method"
            raise FewShotError(
                "an example pool (few_shot_pool / few_shot_truth) is given but no condition "
                f"asks for 'few_shot: auto'{which}; remove it, or add few_shot: auto to a "
                "condition's YAML")
        return False
    if not reports or not truth:
        raise FewShotError(
            f"condition(s) {users} ask for 'few_shot: auto': give the example pool, a reports "
            "table (--few-shot-pool, Serve: few_shot_pool) and the hand labels of those reports "
            "(--few-shot-truth, Serve: few_shot_truth); make them with scripts/split_labels.py, "
            "and calibrate on the other part")
    return True


def load_pool(reports: str, truth: str | Sequence[str], id_column: str = "report_id",
              text_column: str = "text", s3_endpoint: str | None = None) -> ExamplePool:
    """A pool from a reports table (CSV, Parquet or JSON Lines; local or s3://) and truth CSV(s)."""
    from ray_app.evaluation.review import load_truth
    from ray_app.finetune.datasets import read_reports

    frame = read_reports(reports, id_column, text_column, s3_endpoint=s3_endpoint)
    labels = load_truth([truth] if isinstance(truth, str) else list(truth))
    return ExamplePool(frame, labels, source=f"example pool {reports}")


def pool_for(conditions: Sequence[Condition], method: str, reports: str | None,
             truth: str | None, id_column: str = "report_id", text_column: str = "text",
             s3_endpoint: str | None = None) -> ExamplePool | None:
    """The pool these conditions need (checked against them), or None when none needs one."""
    if not check_pool_args(conditions, method, reports, truth):
        for name in (c.name for c in conditions if c.few_shot_auto):
            log.info("%s: 'few_shot: auto' is not used by the %s method", name, method)
        return None
    pool = load_pool(reports, truth, id_column, text_column, s3_endpoint)
    pool.check(conditions)
    return pool


def bind_pool(conditions: Sequence[Condition], pool: ExamplePool | None) -> list[Condition]:
    """The conditions with the pool's identity in their definition hash (auto ones only)."""
    if pool is None:
        return list(conditions)
    return [dataclasses.replace(c, few_shot_pool=pool.identity(c.name)) if c.few_shot_auto else c
            for c in conditions]


def manifest_entry(conditions: Sequence[Condition], pool: ExamplePool | None) -> dict:
    """For a label job's manifest: per auto condition, its pool and example report ids."""
    if pool is None:
        return {}
    return {MANIFEST_KEY: {c.name: {"pool": pool.identity(c.name), "source": pool.source,
                                    "report_ids": pool.report_ids(c.name)}
                           for c in conditions if c.few_shot_auto}}


# --- keeping examples and thresholds apart -----------------------------------------------

def recorded_examples(label_uris: Sequence[str],
                      s3_endpoint: str | None = None) -> dict[str, set[str]]:
    """Per condition, the reports that label folders (jobs/label_reports.py outputs) showed as
    few-shot examples, from their manifests; {} for folders made without a pool."""
    found: dict[str, set[str]] = {}
    for uri in label_uris:
        manifest = tables.read_manifest(tables.locate(uri, s3_endpoint))
        parent = uri.rstrip("/").rsplit("/", 1)
        if manifest is None and len(parent) == 2 and parent[1] == "labels":  # .../out/labels
            manifest = tables.read_manifest(tables.locate(parent[0], s3_endpoint))
        for condition, entry in (manifest or {}).get(MANIFEST_KEY, {}).items():
            found.setdefault(condition, set()).update(map(str, entry.get("report_ids", [])))
    return found


def drop_example_reports(truth: pd.DataFrame, examples: dict[str, set[str]],
                         purpose: str = "the calibration") -> pd.DataFrame:
    """`truth` without the hand labels of reports that were few-shot examples for their
    condition, with a warning that counts them; refused when that leaves a condition none."""
    if not examples or truth.empty:
        return truth
    ids = truth["report_id"].astype(str)
    shown = pd.Series([report_id in examples.get(condition, ())
                       for report_id, condition in zip(ids, truth["condition"])],
                      index=truth.index, dtype=bool)
    if not shown.any():
        return truth
    per_condition = truth[shown].groupby("condition").size()
    left = truth[~shown].groupby("condition").size()
    emptied = [c for c in per_condition.index if c not in left.index]
    if emptied:
        raise FewShotError(
            f"every hand label given for {', '.join(emptied)} is of a report that the labels "
            "showed as a few-shot example, and a threshold chosen on those would be biased: pass "
            "the other part of the split (scripts/split_labels.py), not the example pool's labels")
    log.warning("%d hand label(s) of %d report(s) left out of %s: those reports are few-shot "
                "examples of the labels (%s)", int(shown.sum()), ids[shown].nunique(), purpose,
                ", ".join(f"{c}: {n}" for c, n in per_condition.items()))
    return truth[~shown].reset_index(drop=True)


def split_examples(truth: pd.DataFrame, fraction: float,
                   seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(examples, threshold): hand labels split by report, seeded; about `fraction` of the
    reports, and of each (condition, level)'s positives (at least one where there are two),
    go to the examples part (the same stratified split as jobs/evaluate.py's)."""
    from ray_app.evaluation.runs import split_reports

    if not 0.0 < fraction < 1.0:
        raise FewShotError(f"examples fraction {fraction} must be between 0 and 1")
    example_ids, _ = split_reports(truth, fraction, seed)
    part = truth["report_id"].astype(str).isin(example_ids)
    return truth[part].reset_index(drop=True), truth[~part].reset_index(drop=True)
