"""Report sectioning: split, drop, find the summary, shorten (ray_app/labelling/sections.py)."""

from __future__ import annotations

import pytest

from ray_app.labelling.sections import (
    TRUNCATION_MARK,
    drop_sections,
    find_summary,
    shorten_report,
    split_sections,
    split_sentences,
)

MRI_REPORT = (
    "MRI LUMBAR SPINE 12/03/2021\n"
    "CLINICAL HISTORY: Known prostate cancer. ?metastasis. Back pain.\n"
    "TECHNIQUE: Sagittal T1 and T2, axial T2.\n"
    "COMPARISON: None.\n"
    "FINDINGS: Moderate central canal stenosis at L4-L5. No destructive bone lesion.\n"
    "IMPRESSION: Moderate L4-L5 canal stenosis. No evidence of metastatic disease."
)


def kinds(text: str) -> list[str]:
    return [s.kind for s in split_sections(text)]


def bodies(text: str) -> dict[str, str]:
    return {s.kind: s.body for s in split_sections(text)}


def words_at_most(n: int):
    return lambda text: len(text.split()) <= n


def chars_at_most(n: int):
    return lambda text: len(text) <= n


# --- split_sections -----------------------------------------------------------------------------


def test_full_report_sections_spans_and_bodies():
    sections = split_sections(MRI_REPORT)
    assert [s.kind for s in sections] == [
        "preamble", "history", "technique", "comparison", "findings", "impression"
    ]
    assert [s.header for s in sections[1:]] == [
        "CLINICAL HISTORY", "TECHNIQUE", "COMPARISON", "FINDINGS", "IMPRESSION"
    ]
    assert sections[0].body == "MRI LUMBAR SPINE 12/03/2021"
    assert sections[3].body == "None."  # one-line section
    assert sections[-1].body == (
        "Moderate L4-L5 canal stenosis. No evidence of metastatic disease."
    )
    # Spans tile the text and each starts at its header.
    assert sections[0].start == 0 and sections[-1].end == len(MRI_REPORT)
    for before, after in zip(sections, sections[1:]):
        assert before.end == after.start
        assert MRI_REPORT[after.start : after.end].lstrip().startswith(after.header)


@pytest.mark.parametrize(
    "text",
    [
        "HISTORY: pain\nFINDINGS: stenosis\nIMPRESSION: stenosis at L4-L5",
        "History: pain\nFindings: stenosis\nImpression: stenosis at L4-L5",
        "history: pain\nfindings: stenosis\nimpression: stenosis at L4-L5",
        "HISTORY\npain\nFINDINGS\nstenosis\nIMPRESSION\nstenosis at L4-L5",
        "History\npain\n\nFindings\nstenosis\n\nImpression\nstenosis at L4-L5\n",
        "history\npain\nfindings  \nstenosis\n  impression\nstenosis at L4-L5",
        "HISTORY pain\nFINDINGS stenosis\nIMPRESSION stenosis at L4-L5",
        "HISTORY : pain\nFINDINGS :stenosis\nIMPRESSION:   stenosis at L4-L5",
    ],
    ids=["upper-colon", "title-colon", "lower-colon", "upper-own-line", "title-own-line",
         "lower-own-line", "upper-inline-no-colon", "colon-spacing"],
)
def test_header_case_and_layout_variants(text):
    assert bodies(text) == {
        "history": "pain", "findings": "stenosis", "impression": "stenosis at L4-L5"
    }


def test_several_headers_on_one_flattened_line():
    text = "INDICATION: pain. FINDINGS: x. IMPRESSION: y."
    sections = split_sections(text)
    assert [(s.kind, s.header, s.body) for s in sections] == [
        ("history", "INDICATION", "pain."),
        ("findings", "FINDINGS", "x."),
        ("impression", "IMPRESSION", "y."),
    ]


@pytest.mark.parametrize(
    "header, kind",
    [
        ("CLINICAL HISTORY", "history"), ("HISTORY", "history"), ("Clinical indication", "history"),
        ("REASON FOR EXAM", "history"), ("Reason for examination", "history"),
        ("Indications", "history"), ("TECHNIQUE", "technique"), ("Protocol", "technique"),
        ("COMPARISON", "comparison"), ("Prior studies", "comparison"), ("FINDING", "findings"),
        ("IMPRESSION", "impression"), ("OPINION", "impression"), ("Conclusion", "impression"),
        ("CONCLUSIONS", "impression"), ("SUMMARY", "impression"),
    ],
)
def test_header_words_map_to_kinds(header, kind):
    sections = split_sections(f"Lumbar spine MRI.\n{header}: some text here.")
    assert [(s.kind, s.header, s.body) for s in sections] == [
        ("preamble", "", "Lumbar spine MRI."),
        (kind, header, "some text here."),
    ]


def test_clinical_history_is_one_header_not_history_after_preamble():
    (section,) = split_sections("CLINICAL HISTORY: back pain")
    assert (section.kind, section.header) == ("history", "CLINICAL HISTORY")
    assert section.body == "back pain"


@pytest.mark.parametrize(
    "text",
    [
        "The findings are consistent with degenerative change. The impression is of stenosis.",
        "Findings are consistent with metastasis. History of prostate cancer is noted.",
        "No acute fracture. The conclusion of the prior summary stands; opinion unchanged.",
        "Appearances, in summary, are stable compared with the prior study of 2019.",
    ],
)
def test_prose_with_header_words_is_not_split(text):
    (section,) = split_sections(text)
    assert (section.kind, section.start, section.end, section.body) == (
        "preamble", 0, len(text), text
    )
    assert drop_sections(text, ["history", "findings", "impression"]) == text


def test_header_word_inside_a_body_is_not_a_header():
    sections = split_sections("HISTORY: prior history of cancer.\nFINDINGS: no findings of note.")
    assert [(s.kind, s.body) for s in sections] == [
        ("history", "prior history of cancer."), ("findings", "no findings of note.")
    ]


def test_own_line_headers_with_windows_line_endings():
    text = "FINDINGS\r\nThere is stenosis.\r\nIMPRESSION\r\nStenosis."
    assert kinds(text) == ["findings", "impression"]


def test_dash_after_header():
    text = "Findings - There is stenosis.\nImpression - Stenosis."
    assert bodies(text) == {"findings": "There is stenosis.", "impression": "Stenosis."}


# --- drop_sections ------------------------------------------------------------------------------


def test_no_headers_passes_through_whole():
    text = "  Mild degenerative change.\nNo stenosis.  "
    assert drop_sections(text, ["history"]) == text
    assert split_sections(text)[0].body == text.strip()


def test_drop_history_keeps_every_other_section_verbatim():
    dropped = drop_sections(MRI_REPORT, ["history"])
    assert "prostate cancer" not in dropped and "CLINICAL HISTORY" not in dropped
    expected = MRI_REPORT.replace(
        "CLINICAL HISTORY: Known prostate cancer. ?metastasis. Back pain.\n", ""
    )
    assert dropped == expected
    assert kinds(dropped) == ["preamble", "technique", "comparison", "findings", "impression"]


def test_drop_several_kinds_and_nothing_to_drop():
    assert drop_sections(MRI_REPORT, ["preamble", "history", "technique", "comparison"]) == (
        "FINDINGS: Moderate central canal stenosis at L4-L5. No destructive bone lesion.\n"
        "IMPRESSION: Moderate L4-L5 canal stenosis. No evidence of metastatic disease."
    )
    text = "FINDINGS: x\n\nIMPRESSION: y"
    assert drop_sections(text, ["history"]) == text  # untouched, blank line included
    assert drop_sections(MRI_REPORT, []) == MRI_REPORT


@pytest.mark.parametrize(
    "text, expected",
    [
        ("HISTORY: pain\n\nFINDINGS: x\n\nIMPRESSION: y", "FINDINGS: x\n\nIMPRESSION: y"),
        ("INDICATION: pain. FINDINGS: x. IMPRESSION: y.", "FINDINGS: x. IMPRESSION: y."),
    ],
)
def test_drop_keeps_layout_between_remaining_sections(text, expected):
    assert drop_sections(text, ["history"]) == expected


# --- find_summary -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, body",
    [
        (MRI_REPORT, "impression",
         "Moderate L4-L5 canal stenosis. No evidence of metastatic disease."),
        ("IMPRESSION: first.\nFINDINGS: x.\nCONCLUSION: last.", "impression", "last."),
        ("HISTORY: pain\nFINDINGS: Disc bulge at L5-S1.", "findings", "Disc bulge at L5-S1."),
        ("FINDINGS: Disc bulge.\nIMPRESSION:", "findings", "Disc bulge."),  # empty impression
        ("Findings\nNormal.\nOpinion\nNormal study.", "impression", "Normal study."),
    ],
)
def test_find_summary_preference(text, kind, body):
    summary = find_summary(text)
    assert (summary.kind, summary.body) == (kind, body)


@pytest.mark.parametrize(
    "text", ["HISTORY: pain\nTECHNIQUE: T2.", "The findings are consistent with stenosis.", ""]
)
def test_find_summary_none(text):
    assert find_summary(text) is None


# --- shorten_report -----------------------------------------------------------------------------

LONG_REPORT = (
    "HISTORY: " + " ".join(f"h{i}" for i in range(20))
    + "\nFINDINGS: " + " ".join(f"f{i}" for i in range(40))
    + "\nIMPRESSION: Severe stenosis at L4-L5."
)
IMPRESSION = "IMPRESSION: Severe stenosis at L4-L5."


def test_shorten_returns_text_that_already_fits():
    assert shorten_report(LONG_REPORT, words_at_most(1000)) == LONG_REPORT


@pytest.mark.parametrize(
    "fits",
    [words_at_most(40), words_at_most(12), words_at_most(6), chars_at_most(200),
     chars_at_most(120), chars_at_most(len(TRUNCATION_MARK + IMPRESSION))],
    ids=["40w", "12w", "6w", "200c", "120c", "exact-c"],
)
def test_shorten_keeps_impression_whole_and_fits(fits):
    short = shorten_report(LONG_REPORT, fits)
    assert fits(short) and not fits(short + " one more")
    assert short.endswith(TRUNCATION_MARK + IMPRESSION)
    head = short[: -len(TRUNCATION_MARK + IMPRESSION)]
    assert LONG_REPORT.startswith(head)  # the cut is in the middle, the start is kept


def test_shorten_keeps_the_longest_head_that_fits():
    short = shorten_report(LONG_REPORT, words_at_most(12))
    # Cut by characters: the head keeps its trailing space; one more char would add a word.
    assert short == "HISTORY: h0 h1 h2 h3 h4 " + TRUNCATION_MARK + IMPRESSION


def test_shorten_no_headers_keeps_the_end():
    text = " ".join(f"w{i}" for i in range(60))
    short = shorten_report(text, words_at_most(20))
    assert words_at_most(20)(short) and TRUNCATION_MARK in short
    assert short.endswith("w58 w59") and "w40" not in short and "w0 " not in short
    assert short.split() == ["[...]"] + [f"w{i}" for i in range(41, 60)]


def test_shorten_no_headers_cuts_the_middle_when_the_end_fits():
    text = " ".join(f"w{i}" for i in range(60))
    short = shorten_report(text, words_at_most(40))
    assert len(short.split()) == 40
    assert short.startswith("w0 w1 ") and short.endswith("w58 w59")
    head, tail = short.split(TRUNCATION_MARK)
    assert text.startswith(head) and text.endswith(tail)


def test_shorten_conclusion_itself_too_long_keeps_its_end():
    short = shorten_report(LONG_REPORT, words_at_most(3))
    assert short == TRUNCATION_MARK + " at L4-L5."
    short = shorten_report(LONG_REPORT, chars_at_most(20))
    assert len(short) == 20 and short.startswith(TRUNCATION_MARK)
    assert short.endswith("at L4-L5.") and IMPRESSION.endswith(short[len(TRUNCATION_MARK):])


def test_shorten_keeps_impression_that_comes_first():
    text = "IMPRESSION: Severe stenosis.\nFINDINGS: " + " ".join(f"f{i}" for i in range(40))
    short = shorten_report(text, words_at_most(15))
    assert words_at_most(15)(short)
    assert "IMPRESSION: Severe stenosis." in short


# --- split_sentences -----------------------------------------------------------------------------


def test_sentences_of_every_section_without_headers_or_list_numbers():
    text = ("FINDINGS: There may be a small left effusion. Heart size is normal.\n"
            "IMPRESSION: 1. Possible small effusion. 2. No pneumothorax.")
    assert split_sentences(text) == ("There may be a small left effusion.", "Heart size is normal.",
                                     "Possible small effusion.", "No pneumothorax.")


@pytest.mark.parametrize("text, sentences", [
    ("Atelectasis vs. infiltrate at the base.", ("Atelectasis vs. infiltrate at the base.",)),
    ("A 5.5 cm mass. Stable.", ("A 5.5 cm mass.", "Stable.")),
    ("No effusion\nclear lungs", ("No effusion", "clear lungs")),
    ("Effusion? Likely. (See prior.)", ("Effusion?", "Likely.", "(See prior.)")),
    ("IMPRESSION: 1.\n2. ..", ()),
    ("", ()),
], ids=["abbreviation", "decimal", "line-break", "question-and-bracket", "no-words", "empty"])
def test_sentence_ends(text, sentences):
    assert split_sentences(text) == sentences
