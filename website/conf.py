"""Sphinx configuration of the course's website (``make site``; see ``website/build.py``).

The sources are staged by ``build.py`` into ``build/site-src``: the committed notebooks,
shown as they were last run and never executed here, the glossary, the bad-inputs
catalogue and a home page made from the README's course map.
"""

from __future__ import annotations

import sys
from pathlib import Path

WEBSITE = Path(__file__).resolve().parent
ROOT = WEBSITE.parent
sys.path.insert(0, str(WEBSITE))
sys.path.insert(0, str(ROOT))

project = "bnlab: Batch Normalization, from first principles to kernels"
html_title = "bnlab · Batch Normalization"
author = "the bnlab authors"
copyright = "the bnlab authors, MIT License"
language = "en"

extensions = ["myst_nb", "bnlab_site"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = []

# --- notebooks: shown as committed, never run --------------------------------------------
nb_execution_mode = "off"
# $...$ and $$...$$ math as the notebooks write it (JupyterLab's syntax).
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# The widget manager, vendored from npm by build.py: its standalone bundle, which has the
# base, controls and output widgets built in and needs no RequireJS (myst-nb's default is
# RequireJS and the AMD bundle from public CDNs).
nb_ipywidgets_js = {"vendor/html-manager/embed.js": {}}

# --- offline: everything the pages load comes from the site itself -----------------------
# Relative to _static (Sphinx's rule for mathjax_path); vendored from npm by build.py.
# MathJax finds the parts it loads on demand (TeX extensions, fonts, the menu's tools) next
# to this file, from the script's own address.
mathjax_path = "vendor/mathjax/tex-mml-chtml.js"

html_theme = "sphinx_book_theme"
html_static_path = ["_static", str(ROOT / "build" / "site-vendor" / "static")]
html_css_files = ["bnlab-site.css"]
html_js_files = ["bnlab-site.js"]
html_theme_options = {
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
    # no links to external services in the page chrome
    "use_repository_button": False,
    "use_issues_button": False,
    "use_edit_page_button": False,
}
# Light by default: the notebooks' figures are drawn on white.
html_context = {"default_mode": "light"}
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
# A build of the same sources gives the same files.
html_permalinks_icon = "#"
