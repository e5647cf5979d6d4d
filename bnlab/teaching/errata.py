"""The errata of the five posts (勘误表): the cards of notebook 10, read back, checked, summarized.

Each card of ``notebooks/10_errata.ipynb`` is a markdown cell whose heading is
``### <id> · <section>`` followed by a two-column table (``| key | value |`` lines), then the
code cell that measures the claim, prints what it measured and ends with
``assert verdict == "<the verdict>"``. Part 1 ids are ``<post>-<n>`` (``000-3``), the post
being one of :data:`POSTS`; Part 2 ids (the BN code learners meet next) are
``<source>-<n>`` (``d2l-1``) and carry a ``来源 · source`` line (repository, path, commit)
instead of the ``帖子 · post`` line.

- :func:`rows` reads the cards back (with their code cell's source and printed output);
- :func:`problems` lists what a card lacks: any of its lines (:data:`REQUIRED`), a verdict from
  :data:`VERDICTS`, a topic from :data:`TOPICS`, an assert of its verdict, a printed output;
- :func:`summary_markdown` is the scannable summary at the top of the notebook: one table row per
  card, an index by post and an index by topic (the rows that say the same thing across posts);
- :func:`tally` counts verdicts per post, :func:`tally_markdown` is the closing table
  (:data:`TALLY_BEFORE` -> now);
- three measuring tools the cards share: :func:`moving_average`, the one running-statistics update
  every momentum card re-expresses (each card says which weight its source's momentum is),
  :func:`layer_kinds`, what each node of a model's ``torch.fx`` graph computes (where a network
  puts its BN layers), and :func:`bn_placement`, notebook 05's BN-before vs BN-after runs that
  the placement cards judge from.

``python -m bnlab.teaching.errata summary --write notebooks/10_errata.ipynb`` writes the summary
into the cells marked ``<!-- errata-summary -->`` and the tally into the cell marked
``<!-- errata-tally -->``; ``summary --check`` fails when what is stored is not what the cards
generate (tests/teaching/test_errata.py asserts the same).

Serves notebook 10.
"""

from __future__ import annotations

import json
import numbers
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nbformat


@dataclass(frozen=True)
class Post:
    """One of the five posts, identified the way its readers know it (never more than a title,
    an author line, a link); ``about`` describes it in our words."""

    file: str
    about: str
    title: str | None = None  # the post's title line, where it has one
    heading: str | None = None  # else its first heading
    author: str | None = None
    link: str | None = None

    @property
    def key(self) -> str:
        return self.file[:3]

    def label(self) -> str:
        """``000 · 「1.简介」 · 作者：…``: how a reader recognizes the post."""
        parts = [self.key]
        if self.title:
            parts.append(f"《{self.title}》")
        elif self.heading:
            parts.append(f"first heading 「{self.heading}」")
        if self.author:
            parts.append(f"作者 {self.author}")
        if self.link:
            parts.append(f"<{self.link}>")
        return " · ".join(parts)


AUTHOR = "禅与计算机程序设计艺术"
POSTS = {  # file name -> the post (tally and rows key on the file name)
    p.file: p
    for p in (
        Post("000_e4755a9a28339627.txt", "an introduction: concept, formula, PyTorch's BatchNorm2d",
             heading="1.简介", author=AUTHOR),
        Post("001_3890c17aaf692910.txt", "BN's role in convergence: ICS, the algorithm, an FAQ",
             title="batchnormalization在模型收敛中的作用分析", author=AUTHOR),
        Post("002_c1bff055ae152466.txt", "BN among regularizers and other normalizations",
             heading="1.背景介绍"),
        Post("003_52cbab7bad64c59b.txt", "notes on d2l's scratch BN and its LeNet comparison",
             link="https://share.note.sx/1n8uxleq#aGNsx7qJGdDvOwllGfVdT8XJ3ijXuGsSn7bLWbZLYUA"),
        Post("004_0dfa071f09f09739.txt", "terms, running statistics, training vs eval, folding",
             heading="1.简介", author=AUTHOR),
    )
}  # fmt: skip
VERDICTS = {  # verdict -> its Chinese label
    "right": "对",
    "wrong": "错",
    "right only under a convention": "仅在某种约定下成立",
    "right only under a condition": "仅在某种条件下成立",
    "unproven": "未经证实",
    "not run": "未运行",
}
TOPICS = {  # topic key -> 中文 · English label; cards saying the same thing share a key
    "eps": "数值稳定常数 ε · eps",
    "momentum": "批量规范化动量 · BN's momentum",
    "test-time": "预测模式与移动平均统计量 · eval mode and running statistics",
    "overfitting": "过拟合与泛化 · overfitting and generalization",
    "covariate-shift": "内部协变量偏移 · internal covariate shift",
    "dropout": "暂退法 · Dropout",
    "placement": "批量规范化层的位置 · where BN goes",
    "learning-rate": "学习率 · learning rate",
    "folding": "折叠 · folding BN for inference",
    "batch-size": "批量大小 · batch size",
    "gradients": "梯度消失与爆炸 · vanishing and exploding gradients",
    "formula": "公式与它算什么 · the formula and what it computes",
    "parameters": "拉伸参数 γ 与偏移参数 β · gamma and beta",
    "code": "代码能否照原样运行 · does the code run as printed",
    "other-norms": "其他规范化方法 · other normalizations",
    "speed": "收敛与速度 · convergence and speed",
    "applications": "应用领域 · where BN is used",
}
PART2_LABELS = {  # Part 2 source key -> how the index names it
    "d2l": "Dive into Deep Learning (d2l-en)",
    "fastai": "fastai course22p2",
    "makemore": "Karpathy, nn-zero-to-hero makemore part 3",
    "cs231n": "CS231n assignment 2",
}

SUMMARY_MARK = "<!-- errata-summary -->"
TALLY_MARK = "<!-- errata-tally -->"
HEADING = re.compile(r"^### ((\d{3})|[a-z][a-z0-9]*)-(\d+) · (.+)$", re.M)
TABLE_LINE = re.compile(r"^\| (.+?) \| (.*) \|\s*$", re.M)
ID_ANCHOR = '<a id="card-{}"></a>'  # not '#000-1': that reads as an issue number
COMMIT = re.compile(r"@ `[0-9a-f]{40}`")
HAN = re.compile(r"[\u3400-\u9fff]")

POST_LINE, SOURCE_LINE = "帖子 · post", "来源 · source"
BRIEF, TOPIC, VERDICT = "简述 · in brief", "主题 · topic", "判定 · verdict"
FLIP = "会翻转判定的结果 · would flip if"
REQUIRED = (  # every card's lines besides POST_LINE / SOURCE_LINE
    BRIEF, TOPIC, "说法（转述）", "claim (paraphrased)", VERDICT, "理由", "why", FLIP,
    "详见 · taught in",
)  # fmt: skip
BRIEF_HAN, BRIEF_CHARS = 30, 90  # at most 30 Han characters, at most 90 English characters


@dataclass(frozen=True)
class Row:
    """One card: its id (``"000-3"``, ``"d2l-1"``), post file or Part 2 source key, section,
    verdict, the measuring cell's source and printed text, and the card's table lines."""

    id: str
    post: str
    section: str
    verdict: str | None
    code: str
    printed: str = ""
    lines: dict[str, str] = field(default_factory=dict)
    anchor: bool | None = None  # whether the card holds ID_ANCHOR (None: not read from a card)

    @property
    def part(self) -> int:
        """1 for the five posts, 2 for the BN code learners meet next."""
        return 1 if self.post in POSTS else 2

    @property
    def brief(self) -> tuple[str, str]:
        """The in-brief line as (中文, English); empty strings where it is missing."""
        zh, _, en = self.lines.get(BRIEF, "").partition(" · ")
        return zh.strip(), en.strip()

    @property
    def topic(self) -> str:
        return self.lines.get(TOPIC, "").strip().strip("`")


def _post_file(prefix: str) -> str:
    return next((name for name in POSTS if name.startswith(prefix + "_")), prefix)


def _printed(cell: dict) -> str:
    """The text a code cell printed (stdout streams and text results)."""
    texts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and output.get("name") == "stdout":
            texts.append("".join(output.get("text", "")))
        elif "text/plain" in output.get("data", {}):
            texts.append("".join(output["data"]["text/plain"]))
    return "".join(texts)


def _verdict(value: str) -> str | None:
    match = re.match(r"\*\*(.+?)\*\*", value.strip())
    return match.group(1) if match else None


def _load(notebook: dict | Path) -> dict:
    return json.loads(Path(notebook).read_text()) if isinstance(notebook, Path) else notebook


def rows(notebook: dict | Path) -> list[Row]:
    """Every card of the notebook, with the source and printed text of the code cell after it."""
    cells = _load(notebook)["cells"]
    found = []
    for i, cell in enumerate(cells):
        text = "".join(cell["source"])
        heading = HEADING.search(text) if cell["cell_type"] == "markdown" else None
        if heading is None or text.lstrip().startswith(SUMMARY_MARK):
            continue
        lines = {key.strip(): value.strip() for key, value in TABLE_LINE.findall(text)}
        following = next((c for c in cells[i + 1 :] if c["cell_type"] == "code"), None)
        prefix = heading.group(1)
        found.append(
            Row(
                id=f"{prefix}-{heading.group(3)}",
                post=_post_file(prefix) if heading.group(2) else prefix,
                section=heading.group(4).strip(),
                verdict=_verdict(lines.get(VERDICT, "")),
                code="".join(following["source"]) if following else "",
                printed=_printed(following) if following else "",
                lines=lines,
                anchor=ID_ANCHOR.format(f"{prefix}-{heading.group(3)}") in text,
            )
        )
    return found


def _card_problems(row: Row, require_output: bool) -> list[str]:
    where = SOURCE_LINE if row.part == 2 else POST_LINE
    issues = [
        f"row {row.id}: no '{key}' line" for key in (where, *REQUIRED) if not row.lines.get(key)
    ]
    if row.part == 2 and row.lines.get(SOURCE_LINE) and not COMMIT.search(row.lines[SOURCE_LINE]):
        issues.append(f"row {row.id}: its source line names no 40-hex commit")
    zh, en = row.brief
    if row.lines.get(BRIEF) and (not zh or not en):
        issues.append(f"row {row.id}: the in-brief line needs '中文 · English'")
    if len(HAN.findall(zh)) > BRIEF_HAN or len(en) > BRIEF_CHARS:
        issues.append(
            f"row {row.id}: in brief longer than {BRIEF_HAN} 字 / {BRIEF_CHARS} characters"
        )
    if row.lines.get(TOPIC) and row.topic not in TOPICS:
        issues.append(f"row {row.id}: topic {row.topic!r} is not one of {list(TOPICS)}")
    if row.anchor is False:
        issues.append(f"row {row.id}: no anchor {ID_ANCHOR.format(row.id)} for the summary's link")
    if row.verdict not in VERDICTS:
        issues.append(f"row {row.id}: verdict {row.verdict!r} is not one of {list(VERDICTS)}")
    elif f'assert verdict == "{row.verdict}"' not in row.code:
        issues.append(f'row {row.id}: its cell does not assert verdict == "{row.verdict}"')
    if require_output and not row.printed.strip():
        issues.append(f"row {row.id}: its cell printed nothing (print what it measured)")
    return issues


def problems(found: list[Row], require_output: bool = True) -> list[str]:
    """What the cards lack: a post without rows, a duplicate id, any line of a card, a verdict
    from VERDICTS, a topic from TOPICS, its cell's assert of the verdict, its cell's stored
    output (``require_output=False`` inside a running notebook, whose outputs are not saved yet)."""
    issues = [f"{post}: no row" for post in POSTS if not any(r.post == post for r in found)]
    counts = Counter(r.id for r in found)
    issues += [f"row {i} appears {n} times" for i, n in counts.items() if n > 1]
    for row in found:
        issues += _card_problems(row, require_output)
    return issues


def tally(found: list[Row]) -> dict[str, Counter]:
    """Verdict counts per post file, in :data:`POSTS` order, then per Part 2 source."""
    sources = list(dict.fromkeys(r.post for r in found if r.part == 2))
    return {
        post: Counter(r.verdict for r in found if r.post == post) for post in [*POSTS, *sources]
    }


# The tally of the errata's first version (50 rows, before the cards were re-judged), per post.
TALLY_BEFORE = {
    "000": {"wrong": 6, "unproven": 4},
    "001": {"right": 3, "wrong": 2, "unproven": 6},
    "002": {"right": 1, "wrong": 5, "unproven": 2, "not run": 1},
    "003": {"right": 4, "wrong": 1, "right only under a convention": 1, "unproven": 3},
    "004": {"right": 1, "wrong": 9, "right only under a convention": 1},
}


def _cell(text: str) -> str:
    """A table cell's text: no line breaks, no bare ``|``."""
    return " ".join(text.replace("|", "\\|").split())


def _verdict_cell(verdict: str | None) -> str:
    return f"**{verdict}** · {VERDICTS.get(verdict, '?')}"


def _group_label(post: str) -> str:
    return POSTS[post].label() if post in POSTS else PART2_LABELS.get(post, post)


def _table(found: list[Row], where: str) -> list[str]:
    lines = [
        f"| 编号 · id | {where} | 简述 | in brief | 判定 · verdict |",
        "|---|---|---|---|---|",
    ]
    for row in found:
        place = row.post[:3] if row.part == 1 else PART2_LABELS.get(row.post, row.post)
        zh, en = row.brief
        lines.append(
            f"| [{row.id}](#card-{row.id}) | {_cell(place)}, {_cell(row.section)} | {_cell(zh)} "
            f"| {_cell(en)} | {_verdict_cell(row.verdict)} |"
        )
    return lines


def _link(row: Row) -> str:
    return f"[{row.id}](#card-{row.id}) {row.verdict}"


def summary_cells(found: list[Row]) -> list[str]:
    """The summary as markdown cells, each starting with :data:`SUMMARY_MARK`: the table of
    Part 1, the table of Part 2 (when it has cards), the index by post, the index by topic."""
    part1 = [r for r in found if r.part == 1]
    part2 = [r for r in found if r.part == 2]
    cells = [
        "\n".join([
            SUMMARY_MARK, "## 一览 · Summary", "",
            f"第一部分：五篇帖子的 {len(part1)} 条说法，每行链接到它的卡片。 "
            f"Part 1: {len(part1)} claims of the five posts, each linked to its card.", "",
            *_table(part1, "帖子 · post, 小节 · section"),
        ])
    ]  # fmt: skip
    if part2:
        cells.append(
            "\n".join([
                SUMMARY_MARK, "### 第二部分 · Part 2: the BN code learners meet next", "",
                *_table(part2, "来源 · source, 小节 · section"),
            ])
        )  # fmt: skip
    by_post = [SUMMARY_MARK, "### 按帖子 · Index by post", ""]
    for post in dict.fromkeys(r.post for r in found):
        mine = [r for r in found if r.post == post]
        about = f" ({POSTS[post].about})" if post in POSTS else ""
        by_post.append(f"- **{_cell(_group_label(post))}**{about}: " + ", ".join(map(_link, mine)))
    by_topic = [
        SUMMARY_MARK, "### 按主题 · Index by topic", "",
        "同一主题的说法放在一起，跨帖子对照。 Rows on the same topic, across posts.", "",
    ]  # fmt: skip
    for topic, label in TOPICS.items():
        mine = [r for r in found if r.topic == topic]
        if mine:
            by_topic.append(f"- **{label}** (`{topic}`): " + ", ".join(map(_link, mine)))
    return [*cells, "\n".join(by_post), "\n".join(by_topic)]


def summary_markdown(found: list[Row]) -> str:
    """The whole summary (:func:`summary_cells` joined by blank lines)."""
    return "\n\n".join(summary_cells(found))


def tally_markdown(found: list[Row]) -> str:
    """The closing table, marked :data:`TALLY_MARK`: per post, each verdict's count in the
    errata's first version (:data:`TALLY_BEFORE`) -> now; then Part 2's counts."""
    counts = tally(found)
    header = "| | rows | " + " | ".join(VERDICTS) + " |"
    lines = [TALLY_MARK, "", header, "|---" * (len(VERDICTS) + 2) + "|"]
    totals_before, totals_now = Counter(), Counter()
    for post, now in counts.items():
        key = post[:3] if post in POSTS else post
        before = Counter(TALLY_BEFORE.get(key, {})) if post in POSTS else Counter()
        totals_before += before
        totals_now += now
        cells = [f"{before[v]} → {now[v]}" if post in POSTS else str(now[v]) for v in VERDICTS]
        n = (
            f"{sum(before.values())} → {sum(now.values())}"
            if post in POSTS
            else str(sum(now.values()))
        )
        lines.append(
            f"| {_cell(_group_label(post) if post not in POSTS else key)} | {n} | "
            + " | ".join(cells)
            + " |"
        )
    cells = [f"{totals_before[v]} → {totals_now[v]}" for v in VERDICTS]
    total = f"{sum(totals_before.values())} → {sum(totals_now.values())}"
    lines.append(f"| **all** | {total} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _marked(cell: dict, mark: str) -> bool:
    return cell["cell_type"] == "markdown" and "".join(cell["source"]).lstrip().startswith(mark)


def stored_summary(notebook: dict | Path) -> str:
    """The summary the notebook stores (its cells marked :data:`SUMMARY_MARK`)."""
    cells = _load(notebook)["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if _marked(c, SUMMARY_MARK))


def stored_tally(notebook: dict | Path) -> str:
    """The closing tally the notebook stores (its cell marked :data:`TALLY_MARK`)."""
    cells = _load(notebook)["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if _marked(c, TALLY_MARK))


def write_summary(nb: dict) -> dict:
    """Replace the notebook's summary cells (at the first marked one, else after its first two
    cells) and its tally cell's text by what the cards generate, in place."""
    found = rows(nb)
    cells = nb["cells"]
    marked = [i for i, c in enumerate(cells) if _marked(c, SUMMARY_MARK)]
    at = marked[0] if marked else min(2, len(cells))
    keep = [c for c in cells if not _marked(c, SUMMARY_MARK)]
    new = [
        nbformat.v4.new_markdown_cell(text, id=f"errata-summary-{i}")
        for i, text in enumerate(summary_cells(found))
    ]
    nb["cells"] = keep[:at] + new + keep[at:]
    for cell in nb["cells"]:
        if _marked(cell, TALLY_MARK):
            cell["source"] = tally_markdown(found)
    return nb


# The measuring tools several cards share (the cards' cells call them, never copy them).


def moving_average(running, batch_value, weight_on_new: float):
    """One step of the exponential moving average behind every BN's running statistics:
    ``(1 - weight_on_new) * running + weight_on_new * batch_value`` (a new tensor).

    Sources disagree on what "momentum" names. PyTorch (and d2l's PyTorch tab, fastai's ``mom``)
    weighs the *new* batch by it: pass it as ``weight_on_new``. Keras, TensorFlow, Flax, CS231n
    and zh.d2l.ai weigh the *old* value by theirs: pass ``F.convert_momentum(momentum)``
    (``1 - momentum``). Writing every card's update through this one function leaves the
    convention as the only thing a card states, which is the point the cards make.
    """
    if not (isinstance(weight_on_new, numbers.Real) and 0.0 <= weight_on_new <= 1.0):
        raise ValueError(
            f"weight_on_new must be in [0, 1] (got {weight_on_new!r}); it is the new batch's "
            "weight. A momentum that weighs the old value (Keras, CS231n, Flax) converts with "
            "bnlab.functional.convert_momentum(momentum)"
        )
    return (1.0 - weight_on_new) * running + weight_on_new * batch_value


def layer_kinds(model) -> dict:
    """``model``'s ``torch.fx`` graph, node -> what the node computes, in execution order.

    A module call reads as its class name (``"Conv2d"``, ``"BatchNorm2d"``), a function call as
    the function's name (``"add"``, ``"flatten"``), anything else as its target (``"x"``,
    ``"output"``). Node objects carry their graph edges (``node.args``, ``node.users``), so a
    card asks, e.g., what feeds each BN: ``kinds[node.args[0]]``.
    """
    import torch.fx  # here, not at the top: the summary command needs no torch

    traced = torch.fx.symbolic_trace(model)

    def kind(node) -> str:
        if node.op == "call_module":
            return type(traced.get_submodule(node.target)).__name__
        return getattr(node.target, "__name__", str(node.target))

    return {node: kind(node) for node in traced.graph.nodes}


PLACEMENT_LINE = re.compile(r"(LeNet|MLP)\s+BN (before|after)\s+ReLU: .*?test (\d\.\d+)")


def bn_placement(figures: dict, notebook_05: dict | Path) -> tuple[dict, dict]:
    """Notebook 05's BN-before vs BN-after-the-activation runs, for the placement cards.

    Returns ``(arms, compared)``: ``arms[model, position]`` is each arm's mean test accuracy,
    read from the lines notebook 05 prints (the store keeps only the paired difference), and
    ``compared[model]`` the stored paired compare ``[before minus after, low, high, p]`` of
    ``figures["05.bn_position"]``. Refuses printed lines that are not the stored run's (their
    difference must be the stored one, at the printed precision).
    """
    cells = _load(notebook_05)["cells"]
    printed = "".join(_printed(cell) for cell in cells if cell["cell_type"] == "code")
    arms = {(m[1], m[2]): float(m[3]) for m in PLACEMENT_LINE.finditer(printed)}
    compared = figures["05.bn_position"]["value"]
    expected = {(model, position) for model in compared for position in ("before", "after")}
    if set(arms) != expected:
        raise ValueError(
            f"notebook 05 prints placement lines for {sorted(arms)}, not {sorted(expected)}: "
            "run notebooks/05_lenet.ipynb so its outputs are saved"
        )
    stale = [
        model
        for model, (difference, *_) in compared.items()
        if abs(arms[model, "before"] - arms[model, "after"] - difference) >= 0.002
    ]
    if stale:
        raise ValueError(
            f"notebook 05's printed placement accuracies for {stale} are not the stored run's "
            "(results/results.json 05.bn_position): rerun notebooks/05_lenet.ipynb"
        )
    return arms, compared


def main(argv: list[str] | None = None) -> int:
    """``python -m bnlab.teaching.errata summary (--write | --check) NOTEBOOK``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bnlab.teaching.errata", description=__doc__)
    parser.add_argument("action", choices=["summary"])
    parser.add_argument("notebook", type=Path)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the summary and the tally")
    mode.add_argument("--check", action="store_true", help="fail if they are not up to date")
    args = parser.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    if args.write:
        nbformat.write(write_summary(nb), args.notebook)
        print(f"wrote the summary of {len(rows(nb))} cards into {args.notebook}")
        return 0
    found = rows(nb)
    stale = stored_summary(nb) != summary_markdown(found) or stored_tally(nb) != tally_markdown(
        found
    )
    for problem in problems(found) + (
        ["the stored summary or tally is stale: --write"] if stale else []
    ):
        print(problem)
    return 1 if stale or problems(found) else 0


if __name__ == "__main__":
    sys.exit(main())
