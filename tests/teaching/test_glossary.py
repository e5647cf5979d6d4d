"""docs/glossary.md parses, is consistent, and the course writes its terms as it says."""

from __future__ import annotations

import json

import pytest

from bnlab.teaching import glossary

FIXTURE = """\
# 术语表

Some note with a | pipe-free sentence.

| English | 中文 (preferred) | synonyms (同义词) | where |
|---|---|---|---|
| Batch Normalization | 批量规范化 | 批量归一化、批归一化 | 01, 02 |
| running mean | 运行均值 | 滑动均值 | 03 |
| gradient | 梯度 | — | 01, 02, 05 |
| all-reduce | 全归约 | 全局归约 | (09) |
"""

ENTRIES = glossary.parse(FIXTURE)
REAL = glossary.load()


def test_parser_reads_every_column():
    assert [e.english for e in ENTRIES] == [
        "Batch Normalization",
        "running mean",
        "gradient",
        "all-reduce",
    ]
    bn, _, grad, allreduce = ENTRIES
    assert bn.preferred == "批量规范化"
    assert bn.synonyms == ("批量归一化", "批归一化")
    assert bn.where == ("01", "02") and not bn.later
    assert grad.synonyms == ()
    assert allreduce.where == ("(09)",) and allreduce.later


def test_parser_without_a_table_finds_nothing():
    assert glossary.parse("# no table here\n\n| a | b |\n|---|---|\n| 1 | 2 |\n") == []


def test_the_glossary_has_at_least_40_entries():
    assert len(REAL) >= 40


def test_every_entry_has_english_and_a_preferred_chinese_term():
    for entry in REAL:
        assert entry.english, entry
        assert glossary.CJK.search(entry.preferred), f"{entry.english}: no Chinese term"
        assert entry.where, f"{entry.english}: no where"


def test_no_term_is_preferred_in_one_entry_and_a_synonym_in_another():
    assert not glossary.conflicts(REAL)
    english = [e.english.lower() for e in REAL]
    assert len(english) == len(set(english)), "an English term is listed twice"


def test_conflicts_are_found():
    clash = ENTRIES + [glossary.Entry("minibatch", "滑动均值", (), ("01",))]
    assert glossary.conflicts(clash) == {"滑动均值"}


def test_the_preferred_bn_term_is_d2ls_with_the_posts_terms_as_synonyms():
    (bn,) = [e for e in REAL if e.english == "Batch Normalization"]
    assert bn.preferred == "批量规范化"
    assert {"批量归一化", "批归一化"} <= set(bn.synonyms)


def test_notebook_09s_terms_name_it_now_that_it_exists():
    where = {e.english: e.where for e in REAL}
    for term in ("ghost batch normalization", "synchronized BN", "data parallel", "all-reduce"):
        assert where[term] == ("09",), term


# (a) the English terms appear in the course


def test_mentions_is_case_insensitive_and_not_mid_word():
    assert glossary.mentions("Batch Normalization", "a batch\nnormalization layer")
    assert glossary.mentions("memory bandwidth", "the memory-bandwidth limit")
    assert not glossary.mentions("seed", "linseed oil")


def test_missing_terms_on_a_fixture():
    texts = {"notebooks/01.ipynb": "Batch Normalization keeps a running mean."}
    missing = glossary.missing_terms(ENTRIES, texts)
    assert [e.english for e in missing] == ["gradient"]  # all-reduce waits for 09
    with_09 = glossary.missing_terms(ENTRIES, texts, notebook_09=True)
    assert [e.english for e in with_09] == ["gradient", "all-reduce"]


def test_course_text_kinds():
    for kind in glossary.KINDS:
        assert glossary.course_text(kind), kind
    assert "bnlab/teaching/glossary.py" not in glossary.course_text("docstrings")
    with pytest.raises(ValueError):
        glossary.course_text("posts")


def test_every_english_term_appears_in_the_course():
    texts = glossary.all_course_text()
    missing = glossary.missing_terms(REAL, texts, glossary.has_notebook_09())
    assert not missing, f"not written anywhere in the course: {[e.english for e in missing]}"


# (b) the course's Chinese prose uses the preferred terms


def test_a_synonym_in_prose_fails():
    uses = glossary.synonym_uses(ENTRIES, {"README.md": "## 简介\n\n本课程讲批量归一化。\n"})
    assert [(u.source, u.line, u.synonym, u.preferred) for u in uses] == [
        ("README.md", 3, "批量归一化", "批量规范化")
    ]


@pytest.mark.parametrize(
    "text",
    [
        "> 帖子 000 写道：批归一化能加速收敛。",
        "帖子把它叫作「批量归一化」。",
        "帖子说“滑动均值就是全局均值”，这不对。",
        "本课程使用批量规范化和运行均值。",
        "English only: batch normalization.",
    ],
)
def test_quotations_and_preferred_terms_pass(text):
    assert glossary.synonym_uses(ENTRIES, {"notebooks/01.ipynb": text}) == []


def test_a_synonym_inside_a_longer_preferred_term_passes():
    entries = [
        glossary.Entry("moving average", "移动平均", ("滑动平均",), ("06",)),
        glossary.Entry("exponential moving average", "指数滑动平均", (), ("08",)),
    ]
    assert glossary.synonym_uses(entries, {"x": "这里用指数滑动平均。"}) == []
    assert len(glossary.synonym_uses(entries, {"x": "这里用滑动平均。"})) == 1


def test_the_course_chinese_prose_uses_the_preferred_terms():
    uses = glossary.synonym_uses(REAL, glossary.chinese_prose())
    assert not uses, "\n".join(map(str, uses))


# every notebook's 中文 summary, and the README's quick start


@pytest.mark.parametrize(
    "path", sorted((glossary.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem
)
def test_each_notebook_opens_with_a_chinese_summary_that_links_the_glossary(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    summary = "".join(cells[1]["source"])  # right after the English title and introduction
    assert cells[1]["cell_type"] == "markdown" and summary.startswith("**本节内容**")
    assert 3 <= summary.count("\n- ") + 1 <= 6  # a few lines: what the notebook teaches
    assert summary.rstrip().endswith("术语表：[docs/glossary.md](../docs/glossary.md)")


def test_the_readme_has_a_chinese_quick_start_with_both_commands_and_the_glossary():
    readme = (glossary.ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## 中文快速开始") : readme.index("## Course map")]
    assert "make lab" in quick and "make test" in quick and "docs/glossary.md" in quick
    notebooks = sorted(p.stem for p in (glossary.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert all(stem in quick for stem in notebooks)
