"""bnlab.teaching.prose: every number in what a learner reads is measured or listed."""

from __future__ import annotations

import json

from bnlab.teaching import prose


def numbers(text: str) -> list[str]:
    return [n for n, _ in prose.numbers_in(text)]


def test_numbers_in_finds_decimals_and_ratios_but_not_identifiers():
    text = (
        "BN ahead by 0.138 [0.068, 0.208], about 5× fewer steps and 1.36x per step. "
        "See arXiv:1502.03167, Sec. 3.2, sections 6.6 and 7.5, §2.3, 「2.1 概念」 in 7.5 节, "
        "d2l v1.0, torch 2.14.1, Python 3.11, `lr=0.9` and [a link](https://x.org/1.5)."
    )
    assert numbers(text) == ["0.138 [0.068, 0.208]", "5×", "1.36×"]


def test_an_interval_is_checked_as_one_phrase():
    # every number of the stale interval occurs somewhere, and step counts are integers: the
    # numbers one by one would pass; the phrase does not
    evidence = prose.Evidence(["BN ahead by 50 [32, 67] steps; lr 45 of 19 or 71"], [])
    assert evidence.accounts_for("50 [32, 67]")
    assert not evidence.accounts_for("45 [19, 71]")
    assert not evidence.accounts_for("0 [32, 67]")  # not a tail of a longer number
    assert numbers("fewer steps, 45 [19, 71], and +0.40 [0.40, 0.41]") == [
        "45 [19, 71]",
        "+0.40 [0.40, 0.41]",
    ]


def test_evidence_accepts_a_number_printed_or_stored_at_its_precision():
    evidence = prose.Evidence(["test acc 0.812, ratio 3.64x"], [0.13834, 7.0])
    assert evidence.accounts_for("0.812") and evidence.accounts_for("3.64×")
    assert evidence.accounts_for("0.138") and evidence.accounts_for("0.14")  # rounded store value
    assert not evidence.accounts_for("0.139") and not evidence.accounts_for("0.81")
    assert evidence.accounts_for("0.9")  # a listed constant
    assert len(prose.CONSTANTS) < 60


def test_a_stale_number_in_a_notebook_is_found(tmp_path):
    nb = {"cells": [
        {"cell_type": "markdown", "source": "BN costs 1.36x per step and ends at 0.812."},
        {"cell_type": "code", "source": "",
         "outputs": [{"output_type": "stream", "text": "cost 1.41x"}]},
    ]}  # fmt: skip
    path = tmp_path / "05_x.ipynb"
    path.write_text(json.dumps(nb))
    found = prose.notebook_findings(path, prose.Evidence([], []))
    assert [(f.where, f.number) for f in found] == [
        ("05_x cell 0", "1.36×"),
        ("05_x cell 0", "0.812"),
    ]


def test_readme_prose_leaves_out_generated_blocks():
    text = "a 6.4 GB install\n<!-- results -->\n| 0.777 |\n<!-- /results -->\n"
    text += "<!-- course-map -->\nwritten by hand: 2.5 hours\n<!-- /course-map -->\n"
    assert numbers(prose.readme_prose(text)) == ["6.4", "2.5"]


def test_every_number_in_the_course_prose_is_measured_or_listed():
    found = prose.findings()
    assert not found, (
        "numbers in prose that no output, stored figure or constant backs:\n"
        + "\n".join(map(str, found))
    )


def test_no_verdict_reads_overlapping_intervals_as_equality():
    """Verdicts come from the interval of the difference: "A ahead by d [lo, hi]" or "not
    resolved"; overlap of two intervals of the means is not a test, and "no difference" is
    never what a finite sample shows."""
    from bnlab.teaching import results
    from bnlab.teaching.notebooks import course_notebooks

    banned = ("intervals overlap", "no difference", "cannot tell them apart")
    texts = {"README.md": results.README.read_text()}
    texts.update({p.name: p.read_text() for p in course_notebooks()})
    texts["results.json"] = results.STORE.read_text()
    found = [(name, b) for name, text in texts.items() for b in banned if b in text.lower()]
    assert not found, found
