"""The documentation's code runs as written.

Every fenced ```python block of README.md and docs/*.md runs as a reader
would run it: page by page, the blocks of a page in order in one namespace
(a page builds on its earlier blocks), in a new empty working directory
(the pages write files: model.fgz, lstm.onnx, plots).  Nothing is skipped
and nothing is defined for the blocks: a name a page uses must come from
the page.  Blocks of other languages (bash, text) are not Python and are
not run.

The pages need the optional dependencies (torch, onnx, onnxruntime, keras,
matplotlib); the ``test`` extra installs them all.
"""

import os
import pathlib
import re

import pytest

import fastgates as fg

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# An opening fence "```python" at the start of a line, its body, and the
# closing fence.
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(path):
    """``(first line number, source)`` of each ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def test_block_extraction_finds_every_python_fence():
    # The regex must not miss a block (a fence it does not recognise would
    # quietly leave that code untested): every line that opens a python
    # fence is the start of an extracted block.
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = sum(1 for line in text.splitlines() if line.strip().startswith("```py"))
        assert len(python_blocks(page)) == fences, page.name


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


@pytest.fixture
def reader(tmp_path, monkeypatch):
    """A new working directory, and fastgates' settings and the environment
    put back afterwards (README's block changes the activation mode)."""
    monkeypatch.chdir(tmp_path)
    environ = dict(os.environ)
    mode, threads = fg.get_activation_mode(), fg.get_num_threads()
    yield tmp_path
    fg.set_activation_mode(mode)
    fg.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environ)


def run_page(page):
    """Run the python blocks of ``page`` in order in one namespace."""
    namespace = {"__name__": "__main__"}
    for line, source in python_blocks(page):
        code = compile(source, f"{page.name}:{line}", "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            raise AssertionError(f"the block at {page.name} line {line} fails: "
                                 f"{type(exc).__name__}: {exc}") from exc


# Warnings are errors here as everywhere in the suite (a page should not warn
# its reader), but for one of Keras's own: Keras 3's get_weights() converts its
# variables with an __array__ that NumPy 2 warns about (the values are right;
# tests/test_interop_keras.py and fastgates.keras silence it the same way).
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.default_pass_only
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs_as_written(page, reader):
    run_page(page)


def test_blocks_share_a_namespace_and_a_missing_name_fails(reader):
    # The runner itself: later blocks see what earlier ones defined, and a
    # page using a name it never defines (as docs/interop_keras.md once
    # did with layer1) fails, naming the page and the block's line.
    page = reader / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n```python\nassert x == 1\n```\n")
    run_page(page)
    page.write_text("```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x + layer1\n```\n")
    assert [line for line, _ in python_blocks(page)] == [2, 8]
    with pytest.raises(AssertionError, match=r"page.md line 8 fails: NameError: .*layer1"):
        run_page(page)
