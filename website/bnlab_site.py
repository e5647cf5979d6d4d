"""The course's own Sphinx extension: what the website adds to each notebook page.

- **The deep dive, collapsed.** A notebook's deep dive is everything from its first
  heading that starts with "Deep dive" (the rule of :mod:`bnlab.teaching.path`). On the
  page it sits in a ``<details>`` element, closed, whose summary names it and its minutes;
  the page's table of contents still lists its sections (``bnlab-site.js`` opens it when a
  reader follows one of those links or a search result into it).
- **The reading time** of the main path and the deep dive, under each notebook's title.
- **HTML anchors as link targets.** The errata (10) marks each row with ``<a id="000-1"></a>``
  and links to it as ``[000-1](#000-1)``, which JupyterLab follows; Sphinx resolves a
  ``#`` link only to a target it knows, so each such anchor becomes one (same id), and
  ``-W`` then fails the build on a link to an anchor that does not exist.
- **The PNG behind a saved widget.** A saved dashboard's output holds a widget view and a
  PNG of the same figure; MyST-NB keeps only the view. The PNG is put back in front of it as
  ``img.jupyter-widget``, which the style sheet hides once the widget manager has drawn the
  view (so a reader whose browser cannot run the manager still sees the figure).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform
from sphinx.util import logging

from bnlab.teaching import path as learner_path

logger = logging.getLogger(__name__)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_SCRIPT = re.compile(
    r'<script type="application/vnd\.jupyter\.widget-view\+json">(.*?)</script>', re.S
)
HTML_ANCHOR = re.compile(r'\s*<a\s+(?:id|name)="([^"<>]+)"\s*>\s*(</a>)?\s*')


def _is_html(node) -> bool:
    return isinstance(node, nodes.raw) and "html" in node.get("format", "")


class HtmlAnchorTargets(SphinxTransform):
    """``<a id="x"></a>`` in a notebook's markdown becomes the link target ``x``.

    Inline, MyST gives the opening and the closing tag a raw node each; both go.
    """

    default_priority = 500  # before MyST resolves [text](#x) links (879)

    def apply(self, **kwargs) -> None:
        for raw in list(self.document.findall(nodes.raw)):
            found = HTML_ANCHOR.fullmatch(raw.astext()) if _is_html(raw) else None
            if not found:
                continue
            if not found.group(2):  # the closing tag must follow, with nothing between
                after = raw.next_node(descend=False, siblings=True)
                if not (_is_html(after) and after.astext().strip() == "</a>"):
                    continue
                after.parent.remove(after)
            target = nodes.target("", "", ids=[found.group(1)], names=[found.group(1)])
            raw.replace_self(target)
            self.document.note_explicit_target(target)


class deep_dive(nodes.General, nodes.Element):  # noqa: N801 (docutils names nodes so)
    """The deep dive of a notebook page: a ``<details>`` element, closed by default."""


def visit_deep_dive_html(self, node: deep_dive) -> None:
    summary = html.escape(node["summary"])
    self.body.append(
        '<details class="bnlab-deep-dive">'
        f'<summary><span class="bnlab-deep-dive-label">{summary}</span>'
        f'<span class="bnlab-deep-dive-hint">{html.escape(node["hint"])}</span></summary>\n'
    )


def depart_deep_dive_html(self, node: deep_dive) -> None:
    self.body.append("</details>\n")


def _skip(self, node) -> None:  # other builders: the content, without the wrapper
    pass


def _minutes(value: float) -> str:
    return f"{value:.0f} min"


def _first_deep_dive(doctree: nodes.document) -> nodes.section | None:
    for section in doctree.findall(nodes.section):
        title = section.next_node(nodes.title)
        # the reading-time tool's rule, applied to the heading as markdown writes it
        if title is not None and learner_path.DEEP_DIVE.match(f"# {title.astext()}"):
            return section
    return None


def wrap_deep_dive(doctree: nodes.document, minutes: float) -> str | None:
    """Move the first deep-dive section and everything after it into a deep_dive node.

    What follows a section in reading order is its later siblings, then its parent's later
    siblings, and so on up: all of it moves, in order, into one node at the section's
    place. Returns the deep dive's title, or None when the page has none.
    """
    start = _first_deep_dive(doctree)
    if start is None:
        return None
    title = start.next_node(nodes.title).astext()
    wrapper = deep_dive(summary=title, hint=f"{_minutes(minutes)} · click to open")
    parent = start.parent
    index = parent.index(start)
    moved = list(parent.children[index:])
    node = parent
    while node.parent is not None:
        up = node.parent
        moved += list(up.children[up.index(node) + 1 :])
        node = up
    for child in moved:
        child.parent.remove(child)
        wrapper.append(child)
    parent.insert(index, wrapper)
    return title


def widget_fallbacks(notebook: dict) -> dict[str, str]:
    """model_id -> base64 PNG, for each saved widget view stored with a PNG beside it."""
    found = {}
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data and "image/png" in data:
                found[data[WIDGET_VIEW]["model_id"]] = "".join(data["image/png"])
    return found


def add_widget_fallbacks(doctree: nodes.document, pngs: dict[str, str]) -> int:
    """Put each view's PNG in front of its script, as the widget manager expects it."""
    added = 0
    for raw in list(doctree.findall(nodes.raw)):
        found = WIDGET_SCRIPT.search(raw.astext())
        if not found or "html" not in raw.get("format", ""):
            continue
        model_id = json.loads(found.group(1).replace(r"<\/", "</")).get("model_id")
        if model_id not in pngs:
            continue
        image = (
            '<img class="jupyter-widget bnlab-widget-fallback" alt="the saved figure of this '
            f'widget" src="data:image/png;base64,{pngs[model_id]}">'
        )
        raw.replace_self(nodes.raw("", image + raw.astext(), format="html"))
        added += 1
    return added


def reading_time_note(main: float, deep: float, has_deep_dive: bool) -> nodes.paragraph:
    text = f"Main path: {_minutes(main)}"
    if has_deep_dive:
        text += f" · deep dive (optional, collapsed at the end): {_minutes(deep)}"
    return nodes.paragraph(text, text, classes=["bnlab-reading-time"])


def on_doctree_read(app: Sphinx, doctree: nodes.document) -> None:
    """Each notebook page: its reading time, the PNGs behind widgets, the deep dive closed."""
    docname = app.env.docname
    source = Path(app.env.doc2path(docname))
    if source.suffix != ".ipynb":
        return
    notebook = json.loads(source.read_text())
    main, deep = (part.total for part in learner_path.reading_minutes(notebook))
    has_deep_dive = learner_path.deep_dive_start(notebook) < len(notebook["cells"])

    add_widget_fallbacks(doctree, widget_fallbacks(notebook))
    title = wrap_deep_dive(doctree, deep)
    if has_deep_dive != (title is not None):
        logger.warning(
            f"{docname}: the reading-time tool finds {'a' if has_deep_dive else 'no'} deep "
            f"dive, the page {'has one' if title else 'none'}: their rules for the "
            "heading differ",
            location=docname,
        )
    first = doctree.next_node(nodes.section)
    if first is not None:
        title_node = first.next_node(nodes.title)
        first.insert(first.index(title_node) + 1, reading_time_note(main, deep, has_deep_dive))


def setup(app: Sphinx) -> dict:
    app.add_transform(HtmlAnchorTargets)
    app.add_node(
        deep_dive,
        html=(visit_deep_dive_html, depart_deep_dive_html),
        latex=(_skip, _skip),
        text=(_skip, _skip),
    )
    # After Sphinx's own collectors (priority 500) have read the page's table of contents,
    # so that the deep dive's sections stay listed in it.
    app.connect("doctree-read", on_doctree_read, priority=900)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
