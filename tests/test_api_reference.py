"""The API reference (docs/api/*.rst) documents every public name of trio_es.

The reference is written as one autodoc directive per name, so reading the directives from
the sources is enough: no Sphinx (and no docs extra) is needed, and it takes well under a
second. The docs build (`tox -e docs`, warnings as errors) checks that each directive renders.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import types
import typing
from pathlib import Path

import trio_es

API_DIR = Path(__file__).resolve().parent.parent / "docs" / "api"

# `.. module:: trio_es.x`, `.. currentmodule:: trio_es.x` and `.. automodule:: trio_es.x` set
# the module that the short names after them belong to.
MODULE = re.compile(r"^\.\. (?:py:)?(?:auto)?(?:current)?module:: +(\S+)\s*$", re.MULTILINE)
# `.. autoclass:: Name`, `.. py:data:: Name` ...: one documented object.
OBJECT = re.compile(
    r"^\.\. (?:py:)?(?:auto)?(?:class|exception|function|decorator|data|attribute)::"
    r" +([\w.]+)",
    re.MULTILINE,
)
DIRECTIVE = re.compile(f"{MODULE.pattern}|{OBJECT.pattern}", re.MULTILINE)


def public_modules() -> list[str]:
    """`trio_es` and each of its submodules whose name has no leading underscore."""
    names = (info.name for info in pkgutil.iter_modules(trio_es.__path__))
    return ["trio_es", *sorted(f"trio_es.{name}" for name in names if not name.startswith("_"))]


def public_names(module_name: str) -> set[str]:
    """A module's public names: its `__all__`, else what `dir()` shows that it defines.

    Without `__all__`, names a module only uses are left out: submodules and other modules,
    `from __future__ import annotations`, and names imported from `typing`.
    """
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return set(exported)
    names = set()
    for name in dir(module):
        if name.startswith("_"):
            continue
        value = getattr(module, name)
        if isinstance(value, types.ModuleType) or type(value).__module__ == "__future__":
            continue
        if getattr(typing, name, None) is value:
            continue
        names.add(name)
    return names


def parse(text: str) -> list[str]:
    """The fully qualified names that one reference page's directives document, in order."""
    names = []
    current = "trio_es"
    for match in DIRECTIVE.finditer(text):
        module, name = match.groups()
        if module is not None:
            current = module
        else:
            names.append(name if name.startswith("trio_es.") else f"{current}.{name}")
    return names


def documented_names() -> dict[str, str]:
    """Each fully qualified name the reference documents, with the file that documents it."""
    pages = sorted(API_DIR.glob("*.rst"))
    return {name: page.name for page in pages for name in parse(page.read_text())}


def resolve(qualified_name: str) -> bool:
    """Whether `module.attribute` names an attribute of an importable public module."""
    module_name, _, name = qualified_name.rpartition(".")
    if module_name not in public_modules():
        return False
    return hasattr(importlib.import_module(module_name), name)


def test_every_public_name_is_in_the_api_reference() -> None:
    """Each public name of trio_es and its public submodules has an entry in docs/api."""
    documented = documented_names()
    missing = [
        f"{module}.{name}"
        for module in public_modules()
        for name in sorted(public_names(module))
        if f"{module}.{name}" not in documented
    ]
    assert not missing, (
        f"the API reference lacks {missing}; add an autodoc directive for each to "
        f"the page of its module in {API_DIR}"
    )


def test_every_public_module_has_a_reference_page() -> None:
    """Each public module's names are documented under that module, on a page of docs/api."""
    documented_modules = {name.rpartition(".")[0] for name in documented_names()}
    missing = sorted(set(public_modules()) - documented_modules)
    assert not missing, f"no page in {API_DIR} documents {missing}; add one to api/index.rst"


def test_the_api_reference_names_only_what_exists() -> None:
    """No entry of docs/api names something trio_es does not have (a removed or renamed name)."""
    stale = sorted(name for name in documented_names() if not resolve(name))
    assert not stale, f"the API reference documents {stale}, which trio_es does not have"


def test_the_reference_parser_reads_the_directives_it_must() -> None:
    """The parser sees module switches, short and qualified names, and Sphinx's py: forms."""
    text = (
        ".. module:: trio_es\n\n.. autoclass:: Subject\n   :members:\n\n"
        ".. automodule:: trio_es.supervision\n   :no-members:\n\n"
        ".. autofunction:: worker\n\n.. py:exception:: SupervisorGaveUp\n\n"
        ".. autodata:: trio_es.testing.LEDGER\n   :no-value:\n"
    )
    assert parse(text) == [
        "trio_es.Subject",
        "trio_es.supervision.worker",
        "trio_es.supervision.SupervisorGaveUp",
        "trio_es.testing.LEDGER",
    ]
