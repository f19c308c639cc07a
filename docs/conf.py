"""Sphinx configuration for the trio_es docs site (``tox -e docs``).

The pages are Markdown (MyST) so that GitHub renders them as well; the API reference in
``api/`` is reStructuredText written with autodoc directives, one per public name, so that
``tests/test_api_reference.py`` can check that every public name is in it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer

import trio_es

project = "trio_es"
author = "the trio_es authors"
copyright = "the trio_es authors"
release = trio_es.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Pages link to each other's sections as ``page.md#a-heading``, as GitHub resolves them.
myst_heading_anchors = 4

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# A transaction's errors surface when its ``async with`` block exits; the docstrings say so in
# the section title, which napoleon must know to parse the section as a list of errors.
napoleon_custom_sections = [("Raises on exit", "raises")]

# sphinxcontrib-trio plugs into autodoc's class-based documenters; Sphinx 9's new autodoc
# uses them for ``autofunction`` only, so members (a store's ``transaction()``) would lose
# their ``async with`` marks without the class-based implementation.
autodoc_use_legacy_class_based = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "furo"
html_title = f"trio_es {release}"


def _data_docstring(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """Document a re-exported constant or type alias with its ``#:`` comment.

    autodoc looks for ``#:`` comments only in the module named in the directive (the public
    one), but they are written where the value is defined (a private module); without this,
    ``trio_es.Metadata`` would show the docstring of ``tuple``.
    """
    if what != "data":
        return
    attr = name.rpartition(".")[2]
    for module_name, module in sorted(sys.modules.items()):
        if module_name.partition(".")[0] != "trio_es" or vars(module).get(attr, lines) is not obj:
            continue
        try:
            comment = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", attr))
        except PycodeError:
            continue
        if comment:
            lines[:] = list(comment)
            return
    # No comment anywhere: the value's own docstring (int's, tuple's) would only mislead.
    lines.clear()


def _returns_async_context_manager(function: object) -> bool:
    if not inspect.isfunction(function):
        return False
    returns = inspect.signature(function, eval_str=False).return_annotation
    return "AsyncContextManager" in str(returns)


def _mark_async_context_managers(app: Sphinx) -> None:
    """Mark public functions returning an async context manager, to show as ``async with``.

    sphinxcontrib-trio recognises ``@asynccontextmanager`` functions and those marked with
    ``__returns_acontextmanager__`` (Trio's convention); a store's ``transaction()`` returns
    its context manager object directly, so only its annotation tells.
    """
    submodules = (info.name for info in pkgutil.iter_modules(trio_es.__path__))
    for module_name in ["trio_es", *(f"trio_es.{n}" for n in submodules if n[0] != "_")]:
        module = importlib.import_module(module_name)
        for name in dir(module):  # dir(), as trio_es.testing loads some names on first use
            value = getattr(module, name)
            functions = [value]
            if inspect.isclass(value) and value.__module__.partition(".")[0] == "trio_es":
                functions += [getattr(f, "__func__", f) for f in vars(value).values()]
            for function in filter(_returns_async_context_manager, functions):
                function.__returns_acontextmanager__ = True


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _data_docstring)
    app.connect("builder-inited", _mark_async_context_managers)
    return {"parallel_read_safe": True}
