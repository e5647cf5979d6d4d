"""What a notebook's own code may be: calls into bnlab, and the lesson itself.

The course's rule: notebooks use bnlab instead of re-implementing it. A notebook that
writes its own training loop, accuracy helper, hook or model walk has a second copy of
something bnlab owns (``bnlab.train``, ``bnlab.nn.hooks``), and the two drift apart. So a
notebook's code cells may not

- define a function or class, unless the definition *is* the lesson: a learner's attempt,
  a deliberately broken version, code quoted from elsewhere to be tested, a model built to
  make a point. Those are listed in :data:`LESSON_DEFINITIONS` with the reason; the
  learner's stub ``my_<function>`` of one of the notebook's exercises
  (:data:`bnlab.teaching.exercises.EXERCISES`) may stand anywhere, where the notebook asks
  for it (try first); under a notebook's closing ``## Exercises`` heading, any ``learner_*``
  (a worked wrong attempt for a checker) or ``my_*`` may. The markdown cell right above the
  code must name each definition (in backticks), so the reader is told;
- call ``.step(`` (an optimizer step: training is ``bnlab.train``'s);
- register forward hooks, or walk a model with ``.modules()``, ``.named_modules()`` or
  ``.children()`` (that is ``bnlab.nn.hooks``).

:func:`code_problems` lists the breaches of one notebook; ``tests/teaching`` runs it on every
course notebook. Serves every notebook (`make test`).
"""

from __future__ import annotations

import ast
import re

# notebook stem -> {name it defines: why the definition is the lesson itself}
LESSON_DEFINITIONS: dict[str, dict[str, str]] = {
    "02_math": {
        "learner_identity_params": "a learner's wrong attempt, for the checker",
    },
    "03_scratch": {
        "learner_forward": "a learner's attempt with two classic mistakes, for the checker",
        "learner_forward_2": "a learner's second attempt, one mistake left",
        "learner_forward_fixed": "the learner's corrected forward",
        "LearnerBN": "a learner's module with Keras's momentum convention, for the checker",
    },
    "04_numba_kernels": {
        "tree_steps": "the kernels' warp-shuffle loop on a Python list, counting its steps",
        "learner_merge": "a learner's wrong attempt, for the checker",
    },
    "05_lenet": {
        "learner_t_interval": "a learner's wrong attempt, for the checker",
    },
    "06_pitfalls": {
        "d2l_batch_norm": "Dive into Deep Learning's code, quoted to measure its mode bug",
        "D2LBatchNorm2d": "d2l's layer around that code, quoted with it",
    },
    "10_errata": {
        "scratch_bn": "a post's from-scratch BN function, re-expressed to measure what it does",
        "ScalarBN": "a post's BN class with scalar gamma and beta, re-expressed to measure it",
        "post_fold": "a post's folding formula, re-expressed to test it against fold_bn",
        "stats_as_constants_bn": "fastai's BN forward with its statistics under no_grad, "
        "re-expressed: the gradient it gets is the lesson",
        "stats_differentiated_bn": "the same forward with gradients through the statistics, "
        "the twin that no_grad version is measured against",
        "unbiased_batch_normalize": "makemore's training-mode normalization by the unbiased "
        "variance, re-expressed to measure its factor against torch",
        "FlaggedBatchNorm1d": "makemore's layer with a plain training flag, re-expressed to "
        "measure what the flag left in eval mode does",
    },
    "07_fusion": {
        "Branchy": "a model written to be untraceable by torch.fx",
        "Shared": "a model whose conv module is called twice, which fx's fuse gets wrong",
        "learner_fold": "a learner's wrong attempt, for the checker",
    },
}

HOOKS = re.compile(r"\bregister_(?:full_backward|forward_pre|forward)_hook\b")
WALKS = re.compile(r"\.(?:named_modules|modules|children|named_children)\(\)")
STEP = re.compile(r"\.step\(")
EXERCISE_HEADING = re.compile(r"^## Exercises", re.M)
EXERCISE_NAME = re.compile(r"^(?:learner|my)_\w+$")


def _python(source: str) -> str:
    # IPython magics and shell escapes are not Python: blank them, keep line numbers.
    return "\n".join(
        "" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n")
    )


def _markdown_before(cells: list[dict], index: int) -> str:
    for cell in reversed(cells[:index]):
        if cell["cell_type"] == "markdown":
            return "".join(cell["source"])
    return ""


def _definitions(node: ast.AST):
    """Function and class definitions, outermost first; the body of a definition is its own."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield child
        else:
            yield from _definitions(child)


def _in_exercises(cells: list[dict], index: int) -> bool:
    """Whether cell ``index`` comes after a markdown ``## Exercises`` heading."""
    return any(
        c["cell_type"] == "markdown" and EXERCISE_HEADING.search("".join(c["source"]))
        for c in cells[:index]
    )


def _definition_problems(cells: list[dict], index: int, allowed: dict[str, str]) -> list[str]:
    tree = ast.parse(_python("".join(cells[index]["source"])))
    problems = []
    exercise = _in_exercises(cells, index)
    for node in _definitions(tree):
        if exercise and EXERCISE_NAME.match(node.name) and node.name not in allowed:
            allowed = {**allowed, node.name: "a learner's attempt at an exercise"}
        if node.name not in allowed:
            problems.append(
                f"cell {index} defines {node.name!r}: use bnlab's, or list it in "
                "LESSON_DEFINITIONS if it is the lesson itself"
            )
        elif f"`{node.name}`" not in _markdown_before(cells, index):
            problems.append(
                f"cell {index} defines {node.name!r} ({allowed[node.name]}), but the markdown "
                f"above does not name `{node.name}` to tell the reader"
            )
    return problems


def code_problems(nb: dict, stem: str) -> list[str]:
    """Where notebook ``stem``'s code re-implements bnlab, one message per breach."""
    from bnlab.teaching.exercises import EXERCISES  # torch: imported only when checking

    stubs = {
        f"my_{e.function}": "the learner's stub of an exercise" for e in EXERCISES.get(stem, [])
    }
    allowed = {**stubs, **LESSON_DEFINITIONS.get(stem, {})}
    cells = nb["cells"]
    problems = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        source = _python("".join(cell["source"]))
        problems += _definition_problems(cells, index, allowed)
        for pattern, what in (
            (STEP, "an optimizer step"),
            (HOOKS, "a hook"),
            (WALKS, "a model walk"),
        ):
            if pattern.search(source):
                problems.append(
                    f"cell {index} has {what} of its own: use bnlab.train / bnlab.nn.hooks"
                )
    return problems
