"""Training examples from reports, for the three fine-tuning modes.

An example is a prompt (plain text or a chat conversation) and the target text that the loss is
computed on. Every builder also says how many reports gave examples and, for the others, why
not, so that a user can see when a section header or a label column was not recognised.

- summary SFT (the paper): the report up to its summary section is the context, the summary is
  the target (next-token prediction on the report as written, loss on the summary only);
- instruction-tuned labeller: the labelling job's own direct-query conversation per (report,
  condition, level), the target `yes` or `no`;
- findings -> impression: the findings in a chat request, the impression as the answer.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pandas as pd
import pyarrow.dataset as pads

from ray_app.labelling import prompts
from ray_app.labelling.conditions import Condition
from ray_app.labelling.prompts import Conversation, PromptTemplate
from ray_app.labelling.sections import (
    Section,
    drop_sections,
    find_summary,
    split_sections,
)
from ray_app.pipeline import report_tables as tables

log = logging.getLogger(__name__)

IMPRESSION_REQUEST = (
    "You are a radiologist. Write the impression section of a radiology report from its "
    "findings.\nFindings: {findings}"
)


@dataclass(frozen=True)
class TextExample:
    """One training sequence before tokenisation: loss on `target` only."""

    example_id: str
    prompt: str | Conversation
    target: str
    # Train the end-of-turn token after the target (the model learns to stop); off for a
    # yes/no answer, whose only trained token is the answer that the labeller scores.
    end_turn: bool = True


@dataclass
class BuildReport:
    """How many reports gave examples, and why the others did not."""

    reports: int = 0
    reports_used: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        reasons = "; ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
        return (f"{self.examples} examples from {self.reports_used} of {self.reports} reports; "
                f"reports skipped: {reasons}")


def read_reports(uri: str, id_column: str, text_column: str, limit: int | None = None,
                 s3_endpoint: str | None = None) -> pd.DataFrame:
    """Reports as a frame of `report_id`, `text` (strings; missing text as None)."""
    loc = tables.locate(uri, s3_endpoint)
    fmt = tables.table_format(uri)
    columns = [id_column, text_column]
    if fmt == "json":
        lines = []
        for path in tables.input_files(loc):
            with loc.fs.open_input_stream(path) as f:
                lines.extend(f.read().decode("utf-8").splitlines())
        frame = tables.parse_json_lines(lines, columns, id_column)
    else:
        for column in columns:
            tables.require_column(loc, fmt, column)
        file_format: str | pads.FileFormat = fmt
        if fmt == "csv":
            file_format = pads.CsvFileFormat(parse_options=tables.csv_parse_options(),
                                             convert_options=tables.csv_convert_options(columns))
        frame = pads.dataset(loc.path, format=file_format, filesystem=loc.fs).to_table(
            columns=columns).to_pandas()
    frame = frame.rename(columns={id_column: "report_id", text_column: "text"})
    frame["report_id"] = [tables.clean_id(v) for v in frame["report_id"]]
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.head(limit) if limit else frame


def _usable_rows(reports: pd.DataFrame, report: BuildReport) -> Iterable[tuple[str, str]]:
    """(id, text) of rows with an id and a text; the rest counted in `report`."""
    for raw_id, text in zip(reports["report_id"], reports["text"]):
        report.reports += 1
        report_id = tables.clean_id(raw_id)
        if report_id is None:
            report.skip("missing id")
            continue
        problem = tables.text_problem(text)
        if problem:
            report.skip(problem)
            continue
        yield report_id, text


def _body_start(text: str, section: Section) -> int:
    """Offset of a section's body (after its header) in the report."""
    return text.index(section.body, section.start)


def summary_examples(reports: pd.DataFrame, kinds: Sequence[str] = ("impression", "findings")
                     ) -> tuple[list[TextExample], BuildReport]:
    """Summary SFT: report text up to the summary's body as context, the summary as target."""
    report, examples = BuildReport(), []
    for report_id, text in _usable_rows(reports, report):
        summary = find_summary(text)
        if summary is None:
            report.skip("no summary section (impression/conclusion/summary/findings) found")
            continue
        if summary.kind not in kinds:
            report.skip(f"summary is a {summary.kind} section, not one of {list(kinds)}")
            continue
        if not text[: summary.start].strip():
            report.skip("nothing before the summary section to use as context")
            continue
        # The space or line break after the header starts the target, as in running text
        # (": No acute" is ':' + ' No', not ': ' + 'No').
        end = _body_start(text, summary) + len(summary.body)
        cut = len(text[: _body_start(text, summary)].rstrip())
        examples.append(TextExample(report_id, text[:cut], text[cut:end]))
        report.reports_used += 1
    report.examples = len(examples)
    return examples, report


def impression_examples(reports: pd.DataFrame) -> tuple[list[TextExample], BuildReport]:
    """Findings -> impression: the findings in a chat request, the impression as the answer."""
    report, examples = BuildReport(), []
    for report_id, text in _usable_rows(reports, report):
        sections = split_sections(text)
        findings = [s for s in sections if s.kind == "findings" and s.body]
        impressions = [s for s in sections if s.kind == "impression" and s.body]
        if not findings or not impressions:
            missing = "findings" if not findings else "impression"
            report.skip(f"no non-empty {missing} section")
            continue
        request = IMPRESSION_REQUEST.format(findings="\n".join(s.body for s in findings))
        examples.append(TextExample(report_id, [{"role": "user", "content": request}],
                                    impressions[-1].body))
        report.reports_used += 1
    report.examples = len(examples)
    return examples, report


def labeller_examples(reports: pd.DataFrame, labels: pd.DataFrame,
                      conditions: Sequence[Condition],
                      template: PromptTemplate = prompts.DEFAULT_TEMPLATE
                      ) -> tuple[list[TextExample], BuildReport]:
    """Instruction-tuned labeller: the labelling job's direct-query conversation (sections
    dropped as the condition says) with the human label as the answer, `yes` or `no`."""
    template = prompts.bind_conditions(template, conditions)
    by_sentence = [c.name for c in conditions if c.unit == "sentence"]
    if by_sentence:  # hand labels say which reports, not which sentences, show the finding
        log.warning("condition(s) %s are asked sentence by sentence when labelling (unit: "
                    "sentence), but their hand labels are per report: the adapter learns from "
                    "whole reports and will be asked about single sentences", by_sentence)
    report, examples = BuildReport(), []
    by_report = _labels_by_report(labels, {c.name for c in conditions})
    known = {c.name: c for c in conditions}
    for report_id, text in _usable_rows(reports, report):
        rows = by_report.get(report_id, [])
        if not rows:
            report.skip("no labels for the chosen conditions")
            continue
        made = 0
        for name, level, label in rows:
            condition = known[name]
            if level is not None and level not in condition.levels:
                report.skip(f"level {level!r} is not a level of {name}")
                continue
            context = drop_sections(text, condition.drop_sections)
            conversation = prompts.direct_conversation(template, condition, context, level)
            examples.append(TextExample(f"{report_id}/{name}/{level or ''}", conversation,
                                        "yes" if label else "no", end_turn=False))
            made += 1
        report.reports_used += made > 0
    report.examples = len(examples)
    return examples, report


def _labels_by_report(labels: pd.DataFrame, conditions: set[str]
                      ) -> dict[str, list[tuple[str, str | None, int]]]:
    """(condition, level, 0/1) per report id, for the chosen conditions only."""
    missing = {"report_id", "condition", "label"} - set(labels.columns)
    if missing:
        raise ValueError(f"label table lacks column(s) {sorted(missing)}; it needs report_id, "
                         "condition, level (may be empty) and label (0/1)")
    out: dict[str, list[tuple[str, str | None, int]]] = {}
    levels = labels["level"] if "level" in labels else pd.Series([None] * len(labels))
    for report_id, name, level, label in zip(labels["report_id"], labels["condition"], levels,
                                             labels["label"]):
        if name not in conditions or pd.isna(label):
            continue
        if label not in (0, 1, True, False):
            raise ValueError(f"label {label!r} for report {report_id}, {name} is not 0/1")
        level = None if pd.isna(level) or str(level) == "" else str(level)
        out.setdefault(str(report_id).strip(), []).append((name, level, int(label)))
    return out


def read_labels(uri: str) -> pd.DataFrame:
    """The label table (CSV or Parquet): report_id, condition, level, label."""
    if tables.table_format(uri) == "csv":
        return pd.read_csv(uri, dtype={"report_id": str, "level": str, "condition": str})
    return pd.read_parquet(uri)
