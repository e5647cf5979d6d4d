"""Show bnlab's real source in a notebook, so notebooks never copy code.

Serves notebooks 02, 03, 04 and 07.
"""

from __future__ import annotations

import inspect
import textwrap


def source(obj) -> str:
    """The source code of a bnlab function, class or method, dedented."""
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError) as err:
        raise TypeError(f"cannot show the source of {obj!r}: {err}") from err


def show_source(*objs) -> None:
    """Display the source of each object as a highlighted code block, with its location."""
    from IPython.display import Markdown, display

    for obj in objs:
        where = f"{obj.__module__}.{obj.__qualname__}"
        display(Markdown(f"`{where}`\n```python\n{source(obj)}```"))
