"""bnlab.teaching.notebook_code: notebooks call bnlab, and define only what is the lesson."""

from __future__ import annotations

import nbformat
import pytest

from bnlab.teaching import notebook_code
from bnlab.teaching.notebooks import course_notebooks


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        for kind, text in cells
    ]
    return nb


@pytest.mark.parametrize("path", course_notebooks(), ids=lambda p: p.stem)
def test_course_notebooks_do_not_reimplement_bnlab(path):
    nb = nbformat.read(path, as_version=4)
    assert notebook_code.code_problems(nb, path.stem) == []


def test_every_allowed_definition_exists_in_its_notebook():
    stems = {p.stem: p for p in course_notebooks()}
    for stem, names in notebook_code.LESSON_DEFINITIONS.items():
        text = stems[stem].read_text()
        for name in names:
            assert any(
                f"{kind} {name}{end}" in text
                for kind, end in [("def", "("), ("class", "("), ("class", ":")]
            ), (stem, name)


def test_own_loops_hooks_walks_and_definitions_are_found():
    nb = _nb(
        ("code", "%matplotlib inline\ndef acc(m):\n    return 1"),
        ("code", "opt.zero_grad()\nloss.backward()\nopt.step()"),
        ("code", "h = net[0].register_forward_hook(f)"),
        ("code", "convs = [m for m in net.modules()]"),
        ("code", "class Net(nn.Module):\n    def forward(self, x):\n        return x"),
    )
    problems = notebook_code.code_problems(nb, "99_made_up")
    assert [p.split(" ", 2)[1] for p in problems] == ["0", "1", "2", "3", "4"]
    assert "'acc'" in problems[0] and "optimizer step" in problems[1]
    assert "a hook" in problems[2] and "model walk" in problems[3]
    assert "'Net'" in problems[4] and "'forward'" not in " ".join(problems)


def test_a_lesson_definition_must_be_named_in_the_prose_above(monkeypatch):
    monkeypatch.setitem(notebook_code.LESSON_DEFINITIONS, "99_x", {"attempt": "a learner's try"})
    silent = _nb(("md", "Here is a try:"), ("code", "def attempt(x):\n    return x"))
    told = _nb(
        ("md", "Here is a learner's try, `attempt`:"), ("code", "def attempt(x):\n    return x")
    )
    assert "does not name `attempt`" in notebook_code.code_problems(silent, "99_x")[0]
    assert notebook_code.code_problems(told, "99_x") == []


def test_exercise_attempts_and_stubs_need_no_listing_but_must_be_named():
    stub = "def my_fn(x):\n    raise NotImplementedError"
    told = _nb(("md", "## Exercises\n\nWrite `my_fn`:"), ("code", stub))
    silent = _nb(("md", "## Exercises\n\nWrite it:"), ("code", stub))
    outside = _nb(("md", "Write `my_fn`:"), ("code", stub))
    other = _nb(("md", "## Exercises\n\n`helper`:"), ("code", "def helper(x):\n    return x"))
    assert notebook_code.code_problems(told, "99_x") == []
    assert "does not name `my_fn`" in notebook_code.code_problems(silent, "99_x")[0]
    assert "'my_fn'" in notebook_code.code_problems(outside, "99_x")[0]
    assert "'helper'" in notebook_code.code_problems(other, "99_x")[0]


def test_an_exercise_stub_may_stand_where_the_exercise_is_asked():
    stub = "def my_merge(a, b):\n    raise NotImplementedError"
    told = _nb(("md", "Write `my_merge`:"), ("code", stub))
    assert notebook_code.code_problems(told, "04_numba_kernels") == []  # 04's merge exercise
    assert "'my_merge'" in notebook_code.code_problems(told, "05_lenet")[0]  # not 05's
