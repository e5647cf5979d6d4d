"""bnlab.teaching.errata: notebook 10's cards read back, checked, summarized and counted."""

from __future__ import annotations

from bnlab.teaching import errata
from bnlab.teaching.notebooks import NOTEBOOK_DIR

NOTEBOOK = NOTEBOOK_DIR / "10_errata.ipynb"


def _card(row_id, verdict, section="1.简介", topic="eps", drop=(), where=None):
    where = where or ("帖子 · post", f"{row_id[:3]}, 「{section}」")
    lines = {
        where[0]: where[1],
        "简述 · in brief": "ε 防下溢：错 · eps prevents underflow: wrong",
        "主题 · topic": f"`{topic}`",
        "说法（转述）": "转述",
        "claim (paraphrased)": "paraphrase",
        "判定 · verdict": f"**{verdict}** · ?",
        "理由": "理由",
        "why": "why",
        "会翻转判定的结果 · would flip if": "结果 · outcome",
        "详见 · taught in": "[02_math](02_math.ipynb)",
    }
    table = [f"| {k} | {v} |\n" for k, v in lines.items() if k not in drop]
    return {"cell_type": "markdown", "source": [f"### {row_id} · {section}\n",
                                                f'<a id="card-{row_id}"></a>\n', "\n", "| | |\n",
                                                "|---|---|\n", *table]}  # fmt: skip


def _code(text, printed="measured 1.0\n"):
    outputs = [{"output_type": "stream", "name": "stdout", "text": printed}] if printed else []
    return {"cell_type": "code", "source": [text], "outputs": outputs}


def _asserting(verdict):
    return _code(f'verdict = "{verdict}"\nassert verdict == "{verdict}"')


def test_rows_pair_each_card_with_its_measuring_cell():
    nb = {"cells": [
        _card("000-1", "wrong"), _asserting("wrong"),
        {"cell_type": "markdown", "source": ["## 001\n"]},
        _card("001-1", "unproven", "2.3 作用"), _asserting("right"),
        _card("001-2", "maybe"), _code("pass", printed=""),
    ]}  # fmt: skip
    found = errata.rows(nb)
    assert [(r.id, r.post[:3], r.section, r.verdict, r.part) for r in found] == [
        ("000-1", "000", "1.简介", "wrong", 1),
        ("001-1", "001", "2.3 作用", "unproven", 1),
        ("001-2", "001", "1.简介", "maybe", 1),
    ]
    assert found[0].brief == ("ε 防下溢：错", "eps prevents underflow: wrong")
    assert found[0].topic == "eps" and found[0].printed == "measured 1.0\n"
    issues = errata.problems(found)
    assert 'row 001-1: its cell does not assert verdict == "unproven"' in issues
    assert any(i.startswith("row 001-2: verdict 'maybe'") for i in issues)
    assert "row 001-2: its cell printed nothing (print what it measured)" in issues
    assert any(i.startswith("002_") and i.endswith("no row") for i in issues)
    assert not any(i.startswith("row 000-1") for i in issues)
    assert "row 001-2: its cell printed nothing (print what it measured)" not in errata.problems(
        found, require_output=False
    )


def test_a_card_missing_a_line_or_with_an_unknown_topic_is_caught():
    nb = {"cells": [
        _card("000-1", "right only under a condition", drop=("会翻转判定的结果 · would flip if",)),
        _asserting("right only under a condition"),
        _card("000-2", "wrong", topic="vibes"), _asserting("wrong"),
    ]}  # fmt: skip
    issues = errata.problems(errata.rows(nb))
    assert "row 000-1: no '会翻转判定的结果 · would flip if' line" in issues
    assert any(i.startswith("row 000-2: topic 'vibes'") for i in issues)
    assert not any("000-1: verdict" in i for i in issues)  # the new verdict is a verdict


def test_part2_cards_need_a_source_line_with_a_commit():
    good = ("来源 · source", "[a/b](https://github.com/a/b) `x.py` @ `" + "0" * 40 + "` (f)")
    bad = ("来源 · source", "[a/b](https://github.com/a/b) `x.py` (f)")
    nb = {"cells": [
        _card("d2l-1", "wrong", where=good), _asserting("wrong"),
        _card("cs231n-2", "wrong", where=bad), _asserting("wrong"),
    ]}  # fmt: skip
    found = errata.rows(nb)
    assert [(r.id, r.post, r.part) for r in found] == [
        ("d2l-1", "d2l", 2),
        ("cs231n-2", "cs231n", 2),
    ]
    issues = [i for i in errata.problems(found) if i.startswith("row ")]
    assert issues == ["row cs231n-2: its source line names no 40-hex commit"]


def test_the_summary_has_a_linked_row_per_card_and_groups_topics_across_posts():
    nb = {"cells": [
        _card("000-5", "wrong"), _asserting("wrong"),
        _card("002-3", "right", topic="eps"), _asserting("right"),
        _card("001-7", "unproven", topic="dropout"), _asserting("unproven"),
    ]}  # fmt: skip
    found = errata.rows(nb)
    text = errata.summary_markdown(found)
    assert text.startswith(errata.SUMMARY_MARK)
    assert (
        "| [000-5](#card-000-5) | 000, 1.简介 | ε 防下溢：错 | eps prevents underflow: wrong |"
        in text
    )
    topic_line = next(line for line in text.splitlines() if "(`eps`)" in line)
    assert "[000-5](#card-000-5) wrong" in topic_line and "[002-3](#card-002-3) right" in topic_line
    assert "001-7" not in topic_line
    post_line = next(line for line in text.splitlines() if line.startswith("- **001"))
    assert "batchnormalization在模型收敛中的作用分析" in post_line  # 001 by its title line
    assert "share.note.sx" in errata.POSTS["003_52cbab7bad64c59b.txt"].label()


def test_the_tally_table_counts_before_and_after():
    nb = {"cells": [_card("000-1", "right"), _asserting("right")]}
    text = errata.tally_markdown(errata.rows(nb))
    row = next(line for line in text.splitlines() if line.startswith("| 000 |"))
    assert row.startswith("| 000 | 10 → 1 | 0 → 1 | 6 → 0 |")


def test_the_errata_notebook_has_every_line_of_every_card_measured_and_printed():
    found = errata.rows(NOTEBOOK)
    assert errata.problems(found) == []
    counts = {post[:3]: sum(c.values()) for post, c in errata.tally(found).items()}
    assert all(counts[post[:3]] >= 2 for post in errata.POSTS), counts
    assert sum(counts.values()) == len(found) >= 50
    assert sum(r.part == 2 for r in found) >= 8


def test_the_stored_summary_and_tally_are_the_ones_the_cards_generate():
    found = errata.rows(NOTEBOOK)
    assert errata.stored_summary(NOTEBOOK) == errata.summary_markdown(found), (
        "run `python -m bnlab.teaching.errata summary --write notebooks/10_errata.ipynb`"
    )
    assert errata.stored_tally(NOTEBOOK) == errata.tally_markdown(found)


def test_the_errata_notebook_records_its_tally():
    from bnlab.teaching.results import notebook_results

    assert "10.errata" in notebook_results(NOTEBOOK)


def test_the_errata_notebook_calls_a_post_one_word():
    import json

    cells = json.loads(NOTEBOOK.read_text())["cells"]
    texts = ["".join(c["source"]) for c in cells]
    assert not [t[:60] for t in texts if "文章" in t or "文中" in t], "a post is 帖子 here"
    found = errata.rows(NOTEBOOK)
    generated = errata.summary_markdown(found) + errata.tally_markdown(found)
    assert "文章" not in generated and "帖子" in generated and errata.POST_LINE.startswith("帖子")


def test_moving_average_is_torchs_update_once_the_convention_is_stated():
    import pytest
    import torch

    from bnlab import functional as F

    torch.manual_seed(0)
    batches = [torch.randn(32, 4) * 2 + 1 for _ in range(20)]
    reference = torch.nn.BatchNorm1d(4, affine=False, momentum=0.1)
    new_weight, old_weight = torch.zeros(4), torch.zeros(4)
    for x in batches:
        reference(x)
        new_weight = errata.moving_average(new_weight, x.mean(0), weight_on_new=0.1)
        # a Keras/CS231n momentum of 0.9 weighs the old value: converted, the same average
        old_weight = errata.moving_average(old_weight, x.mean(0), F.convert_momentum(0.9))
    assert torch.allclose(new_weight, reference.running_mean, atol=1e-6)
    assert torch.allclose(old_weight, reference.running_mean, atol=1e-6)
    unconverted = torch.zeros(4)
    for x in batches:
        unconverted = errata.moving_average(unconverted, x.mean(0), weight_on_new=0.9)
    assert (unconverted - reference.running_mean).abs().max() > 0.05  # the convention matters
    running = torch.ones(4)
    with pytest.raises(ValueError, match=r"weight_on_new must be in \[0, 1\].*convert_momentum"):
        errata.moving_average(running, torch.zeros(4), weight_on_new=1.5)
    assert torch.equal(running, torch.ones(4))  # a new tensor: the input is never changed


def test_layer_kinds_names_each_node_of_the_graph_in_order():
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    kinds = errata.layer_kinds(Residual())
    assert list(kinds.values()) == ["x", "Conv2d", "BatchNorm2d", "add", "relu", "output"]
    bn = next(node for node, kind in kinds.items() if kind == "BatchNorm2d")
    assert kinds[bn.args[0]] == "Conv2d" and [kinds[u] for u in bn.users] == ["add"]


def test_bn_placement_reads_each_arm_and_refuses_lines_of_another_run():
    import pytest

    figures = {"05.bn_position": {"value": {"LeNet": [-0.001, -0.012, 0.010, 0.77],
                                            "MLP": [0.0, -0.007, 0.007, 0.95]}}}  # fmt: skip
    line = "{} BN {:6} ReLU: lr 0.1 (chosen on validation), test {} ± 0.008 [0.84, 0.86], 5 seeds\n"
    arms_printed = [("LeNet", "before", "0.851"), ("LeNet", "after", "0.852"),
                    ("MLP", "before", "0.851"), ("MLP", "after", "{mlp_after}")]  # fmt: skip
    lines = "".join(line.format(*arm) for arm in arms_printed)
    notebook = {"cells": [_code("", printed=lines.format(mlp_after="0.851"))]}
    arms, compared = errata.bn_placement(figures, notebook)
    assert arms == {("LeNet", "before"): 0.851, ("LeNet", "after"): 0.852,
                    ("MLP", "before"): 0.851, ("MLP", "after"): 0.851}  # fmt: skip
    assert compared is figures["05.bn_position"]["value"]
    stale = {"cells": [_code("", printed=lines.format(mlp_after="0.861"))]}  # another run's line
    with pytest.raises(ValueError, match=r"\['MLP'\].*rerun notebooks/05_lenet.ipynb"):
        errata.bn_placement(figures, stale)
    with pytest.raises(ValueError, match="run notebooks/05_lenet.ipynb"):
        errata.bn_placement(figures, {"cells": [_code("", printed=lines.splitlines()[0])]})


def test_bn_placement_reads_notebook_05_as_saved():
    import json

    from bnlab.teaching.results import STORE

    figures = json.loads(STORE.read_text())["figures"]
    arms, compared = errata.bn_placement(figures, NOTEBOOK_DIR / "05_lenet.ipynb")
    assert set(compared) == {"LeNet", "MLP"} and len(arms) == 4
    assert all(0.1 < accuracy <= 1 for accuracy in arms.values())
