"""Sphinx configuration of the guft_jax documentation (``make docs``)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "guft_jax"
author = "guft_jax authors"
copyright = "2026, guft_jax authors"  # noqa: A001

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "generated"]  # generated/ pages are included by others

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "undoc-members": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass fields are documented once, by autodoc

html_theme = "furo"
html_title = "guft_jax"
# A local MathJax copy (see docs/README.md) lets the pages render formulas offline.
if os.environ.get("GUFT_DOCS_MATHJAX"):
    mathjax_path = os.environ["GUFT_DOCS_MATHJAX"]
