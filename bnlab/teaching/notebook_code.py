"""What a notebook's own code may be: calls into bnlab, and the lesson itself.

The course's rule: notebooks use bnlab instead of re-implementing it. A notebook that
writes its own training loop, accuracy helper, hook or model walk has a second copy of
something bnlab owns (``bnlab.train``, ``bnlab.nn.hooks``), and the two drift apart. So a
notebook's code cells may not

- define a function or class, unless the definition *is* the lesson: a learner's attempt,
  a deliberately broken version, code quoted from elsewhere to be tested, a model built to
  make a point. Those are listed in :data:`LESSON_DEFINITIONS` with the reason, or, under a
  notebook's closing ``## Exercises`` heading, named ``learner_*`` (a worked wrong attempt
  for a checker of :mod:`bnlab.teaching.exercises`) or ``my_*`` (the learner's stub); the
  markdown cell right above the code must name them (in backticks), so the reader is told;
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
        "my_bn_backward_dx": "the learner's stub, where the backward is derived (try first)",
        "my_identity_params": "the learner's stub, where the identity's parameters are asked",
        "learner_identity_params": "a learner's wrong attempt, for the checker",
    },
    "03_scratch": {
        "my_bn_forward": "the learner's stub, before the reference forward is shown (try first)",
        "my_bn_backward": "the learner's stub, before the reference backward is shown",
        "my_running_stats_step": "the learner's stub, before the running-statistics update",
        "learner_forward": "a learner's attempt with two classic mistakes, for the checker",
        "learner_forward_2": "a learner's second attempt, one mistake left",
        "learner_forward_fixed": "the learner's corrected forward",
        "LearnerBN": "a learner's module with Keras's momentum convention, for the checker",
    },
    "04_numba_kernels": {
        "tree_steps": "the kernels' tree loop on a Python list, counting its barrier steps",
        "my_merge": "the learner's stub, before bnlab's merge_moments is shown (try first)",
        "learner_merge": "a learner's wrong attempt, for the checker",
        "my_welford_update": "the learner's stub, before the kernels' thread_welford is shown",
    },
    "05_lenet": {
        "my_lenet_with_bn": "the learner's stub, before bnlab's lenet is shown (try first)",
        "learner_t_interval": "a learner's wrong attempt, for the checker",
        "my_t_interval": "the learner's stub, before bnlab's mean_and_interval is shown",
    },
    "06_pitfalls": {
        "d2l_batch_norm": "Dive into Deep Learning's code, quoted to measure its mode bug",
        "D2LBatchNorm2d": "d2l's layer around that code, quoted with it",
        "my_predict": "the learner's stub, at the pitfall it fixes (try first)",
        "my_keras_to_torch": "the learner's stub, before bnlab's convert_momentum is shown",
        "my_recalibrate": "the learner's stub, before bnlab's recalibrate_bn is used",
    },
    "09_distributed": {
        "my_merge_replica_stats": "the learner's stub, before bnlab's global_moments is shown",
        "my_ghost_bn": "the learner's stub, before GhostBatchNorm2d's forward is shown",
    },
    "10_errata": {
        "scratch_bn": "a post's from-scratch BN function, re-expressed to measure what it does",
        "ScalarBN": "a post's BN class with scalar gamma and beta, re-expressed to measure it",
        "post_fold": "a post's folding formula, re-expressed to test it against fold_bn",
    },
    "07_fusion": {
        "Branchy": "a model written to be untraceable by torch.fx",
        "Shared": "a model whose conv module is called twice, which fx's fuse gets wrong",
        "my_scale_shift": "the learner's stub, before bnlab's bn_scale_shift is shown (try first)",
        "my_fold": "the learner's stub, before bnlab's fold_bn is shown (try first)",
        "learner_fold": "a learner's wrong attempt, for the checker",
        "my_fold_into_next_linear": "the learner's stub, before fold_bn_into_next_conv is shown",
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
    allowed = LESSON_DEFINITIONS.get(stem, {})
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
