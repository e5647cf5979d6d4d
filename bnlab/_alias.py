"""Learners' import paths, kept working after the modules moved into folders.

``import bnlab.functional`` (and ``from bnlab import functional``) give the module object of
``bnlab.nn.functional`` itself, not a copy of its names: monkeypatching, ``show_source`` and
``isinstance`` checks see one module under two names.
"""

from __future__ import annotations

import importlib
import sys


def alias(name: str, home: str) -> None:
    """Make the module being imported as ``name`` the module ``home``.

    Called from the short module ``name`` itself: the import system hands out whatever
    ``sys.modules[name]`` holds once that module has run, so every importer gets ``home``.
    """
    if name != "__main__":  # `python -m bnlab.data` runs the file: keep it runnable
        sys.modules[name] = importlib.import_module(home)
