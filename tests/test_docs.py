"""The documentation's examples run and print what the page says they print.

Every ```python block in README.md and docs/*.md is a complete program that the suite runs.
What it prints is checked too: a ```python block followed directly (blank lines aside) by an
```output block must write exactly that block's text to stdout; a ```python block with no
```output block after it must print nothing. Code that must not run (shell commands, partial
snippets) goes in a block of another language (```sh, ```text, ```pycon ...).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE
)


@attrs.frozen
class Example:
    """A runnable block and the stdout its page promises (empty when it shows none)."""

    code: str
    output: str


def examples_in(text: str) -> list[Example]:
    """The ```python blocks of a Markdown page, each with its ```output block's text."""
    fences = list(FENCE.finditer(text))
    found = []
    for fence, after in zip(fences, [*fences[1:], None], strict=False):
        if fence["lang"] != "python":
            continue
        follows = (
            after is not None
            and after["lang"] == "output"
            and text[fence.end() : after.start()].strip() == ""
        )
        found.append(Example(fence["body"], after["body"] if follows and after else ""))
    return found


named_examples = [
    (f"{page.name}:{n}", example)
    for page in PAGES
    for n, example in enumerate(examples_in(page.read_text()), start=1)
]
examples = [pytest.param(name, example, id=name) for name, example in named_examples]


def _run(example: Example) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-W", "error", "-c", example.code]
    with tempfile.TemporaryDirectory() as workdir:
        try:
            return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            # That example fails alone; the others' results stay (the cache keeps no error).
            return subprocess.CompletedProcess(command, -1, "", "timed out after 60 s")


@functools.cache
def _results() -> dict[str, subprocess.CompletedProcess[str]]:
    # Each example is a process of its own, mostly waiting on imports: running them side by
    # side keeps the page checks fast as the docs grow.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2)) as pool:
        futures = {name: pool.submit(_run, example) for name, example in named_examples}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize(("name", "example"), examples)
def test_documented_example_runs(name: str, example: Example) -> None:
    """A documented example runs without an error and prints exactly its output block."""
    result = _results()[name]
    assert result.returncode == 0, result.stderr
    assert result.stdout == example.output


def test_there_are_examples_to_run() -> None:
    """The docs do carry runnable examples (the parametrized test is not vacuous)."""
    assert len(named_examples) >= 5
    assert sum(1 for _, example in named_examples if example.output) >= 5


def test_output_blocks_follow_code() -> None:
    """Every ```output block directly follows a ```python block, so none is silently unchecked."""
    for page in PAGES:
        text = page.read_text()
        fences = list(FENCE.finditer(text))
        for before, fence in zip([None, *fences], fences, strict=False):
            if fence["lang"] != "output":
                continue
            assert before is not None, page.name
            assert before["lang"] == "python", page.name
            assert text[before.end() : fence.start()].strip() == "", page.name


def test_output_convention() -> None:
    """The parser pairs a code block with the output block right after it, and only that one."""
    page = (
        "```python\nprint(1)\n```\n\n```output\n1\n```\n"
        "```python\npass\n```\ntext\n```output\nx\n```\n"
        "```sh\nls\n```\n"
    )
    assert examples_in(page) == [Example("print(1)\n", "1\n"), Example("pass\n", "")]
