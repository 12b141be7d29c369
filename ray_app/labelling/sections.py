"""Split a radiology report into sections from its headers, drop some, find its summary.

Real reports write headers in any case, with or without a colon, on a line of their own or
inline before a one-line section ("COMPARISON: None."). Text before the first header is kept
as a preamble. A report with no recognised header passes through whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

# Header words and the kind of section each starts. Kinds are what condition specs refer to.
_HEADERS: dict[str, tuple[str, ...]] = {
    "history": (
        "clinical history", "clinical information", "clinical indication", "clinical details",
        "clinical notes", "history", "indications", "indication", "reason for examination",
        "reason for exam", "reason for study",
    ),
    "technique": ("technique", "procedure", "protocol", "sequences"),
    "comparison": ("comparisons", "comparison", "prior studies", "prior study"),
    "findings": ("findings", "finding"),
    "impression": (
        "impressions", "impression", "conclusions", "conclusion", "summary", "opinion",
    ),
}
SECTION_KINDS: tuple[str, ...] = ("preamble", *_HEADERS)
# Order in which a section counts as "the summary" (the method's rule: conclusion, impression,
# findings or summary, case-insensitive).
_SUMMARY_PREFERENCE = ("impression", "findings")

_KIND_OF = {word: kind for kind, words in _HEADERS.items() for word in words}
_WORDS = "|".join(sorted((re.escape(w) for w in _KIND_OF), key=len, reverse=True))
# "FINDINGS:" / "Findings -" at a line start, or after a sentence end on the same line.
_WITH_COLON = re.compile(
    rf"(?:^|(?<=[.;!?])[ \t]+)[ \t]*(?P<h>{_WORDS})[ \t]*(?::|[-\u2013][ \t])[ \t]*", re.IGNORECASE | re.MULTILINE
)
# A header alone on its line, any case, no colon.
_OWN_LINE = re.compile(rf"^[ \t]*(?P<h>{_WORDS})[ \t]*\r?$\n?", re.IGNORECASE | re.MULTILINE)
# An upper-case header followed by text on the same line, no colon ("FINDINGS There is ...").
_UPPER_INLINE = re.compile(rf"^[ \t]*(?P<h>{_WORDS.upper()})[ \t]+(?=\S)", re.MULTILINE)


@dataclass(frozen=True)
class Section:
    """A span of the original report text; `start`/`end` include the header."""

    kind: str
    header: str
    start: int
    end: int
    body: str


def split_sections(text: str) -> list[Section]:
    """Sections in report order. No header found -> one 'preamble' section, the whole text."""
    matches = _header_matches(text)
    if not matches:
        return [Section("preamble", "", 0, len(text), text.strip())]
    sections = []
    if text[: matches[0].start()].strip():
        first = matches[0].start()
        sections.append(Section("preamble", "", 0, first, text[:first].strip()))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        header = match.group("h")
        body = text[match.end() : end].strip()
        sections.append(Section(_KIND_OF[header.lower()], header, match.start(), end, body))
    return sections


def _header_matches(text: str) -> list[re.Match]:
    """All header matches, earliest first, overlapping ones removed."""
    found = [m for rx in (_WITH_COLON, _OWN_LINE, _UPPER_INLINE) for m in rx.finditer(text)]
    found.sort(key=lambda m: (m.start(), -m.end()))
    kept: list[re.Match] = []
    for match in found:
        if kept and match.start() < kept[-1].end():
            continue
        kept.append(match)
    return kept


def drop_sections(text: str, kinds: tuple[str, ...] | list[str]) -> str:
    """The report without sections of the given kinds; original wording and layout kept."""
    if not kinds:
        return text
    sections = split_sections(text)
    if not any(s.kind in kinds for s in sections):
        return text
    pieces: list[str] = []
    for section in (s for s in sections if s.kind not in kinds):
        piece = text[section.start : section.end]
        # Keep the original layout; add a line break only where two kept pieces would touch.
        if pieces and not pieces[-1][-1:].isspace() and not piece[:1].isspace():
            piece = "\n" + piece
        pieces.append(piece)
    return "".join(pieces).strip()


def find_summary(text: str) -> Section | None:
    """The report's summary section (impression/conclusion/summary/opinion, else findings)."""
    sections = split_sections(text)
    for kind in _SUMMARY_PREFERENCE:
        candidates = [s for s in sections if s.kind == kind and s.body]
        if candidates:
            return candidates[-1]
    return None


TRUNCATION_MARK = " [...] "


def shorten_report(text: str, fits: Callable[[str], bool]) -> str:
    """The longest version of `text` that `fits`, cutting the middle and keeping the conclusion.

    The summary section (or, with no headers, the end of the report) is kept whole where
    possible; what goes is the text just before it. `fits` is usually a token-count check.
    """
    if fits(text):
        return text
    summary = find_summary(text)
    if summary is not None and summary.kind == "impression":
        keep = text[summary.start : summary.end].rstrip()
        head, tail = text[: summary.start], text[summary.end :]
    else:  # no conclusion section: the end of the report is where conclusions are written
        cut = len(text) * 2 // 3
        keep, head, tail = text[cut:], text[:cut], ""
    # Text after the conclusion (rare: an impression written first) goes before the head does.
    kept_tail = TRUNCATION_MARK + tail if tail and not fits(head + keep + tail) else tail
    if kept_tail != tail:
        kept_tail = ""
        keep = keep + TRUNCATION_MARK.rstrip()
    rest = TRUNCATION_MARK + keep + kept_tail
    best = _longest_fitting(len(head), lambda n: fits(head[:n] + rest))
    if best is not None:
        return head[:best] + rest
    # Even the conclusion alone is too long: keep its end.
    best = _longest_fitting(len(keep), lambda n: fits(TRUNCATION_MARK + keep[len(keep) - n :]))
    return TRUNCATION_MARK + keep[len(keep) - (best or 0) :]


def _longest_fitting(limit: int, fits_n: Callable[[int], bool]) -> int | None:
    if not fits_n(0):
        return None
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if fits_n(mid):
            low = mid
        else:
            high = mid - 1
    return low


# A sentence ends at . ! or ? followed by space and a capital, a digit or an opening quote or
# bracket ("vs. infiltrate" and "5.5 cm" go on), or at a line break; list numbers ("1.") and
# pieces without words (a lone "2." or "..") are dropped.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\s*\n\s*")
_LIST_NUMBER = re.compile(r"^\(?\d{1,2}[.)]\s+")
_MIN_LETTERS = 3


def split_sentences(text: str) -> tuple[str, ...]:
    """The sentences of a report's section bodies, in report order, headers left out.

    A condition asked sentence by sentence (`unit: sentence`) is asked about each of these;
    a report with none (no letters at all) gives no sentences."""
    sentences = []
    for section in split_sections(text):
        for piece in _SENTENCE_END.split(section.body):
            piece = _LIST_NUMBER.sub("", piece.strip()).strip()
            if sum(ch.isalpha() for ch in piece) >= _MIN_LETTERS:
                sentences.append(piece)
    return tuple(sentences)
