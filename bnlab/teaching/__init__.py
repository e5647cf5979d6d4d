"""Teaching tools: what the notebooks use to show, check and explain.

- ``check``: checkers that tell a learner's BN from its typical mistakes (03);
- ``exercises``: the checkers of every notebook's closing exercises, whose reference
  solutions CI runs from ``solutions/`` (01-08);
- ``widgets``: the eps / momentum / batch-size dashboard (03);
- ``plots``: matplotlib helpers, one picture each (01, 02, 03, 04, 05, 06, 07, 08, 09);
- ``show``: a function's real source, and side-by-side numeric comparisons (02, 03, 07);
- ``doctor``: a detector for train/eval pitfalls (06);
- ``errata``: the rows of notebook 10 (the errata of the five seed posts), read back and
  counted (10);
- ``results``: the results store that full runs write, and the README tables built from it
  (``make readme``);
- ``prose``: every number in the notebooks' and the README's prose is measured or listed
  (``make test``);
- ``timings``: how long the README's commands take, measured from a fresh clone
  (``make timings``);
- ``glossary``: the bilingual glossary ``docs/glossary.md`` and its course checks (01-08);
- ``notebook_code``: what a notebook's own code may be (calls into bnlab, and the lesson);
- ``notebooks``: the committed notebooks' metadata, trust and clean outputs
  (``python -m bnlab.teaching.notebooks``; ``make test``);
- ``path``: the learner's path: each notebook's main-path and deep-dive reading time, no
  answer shown before its exercise, no words of the project's process (``make test``).
"""
