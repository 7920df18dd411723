"""Every ```python block of README.md runs as written.

Each block is executed in this process, in the order of the README, in a fresh namespace (a block must be complete:
its own imports and data) and in a temporary working directory (files a block writes, e.g. ``data/example`` or
``served``, go there). Tracebacks point at the README's own lines. A block that trains (calls ``.fit(``) is marked
slow (about a minute on 2 cores); the others take seconds. The README documents the TensorFlow backend (tf.data
loaders, SavedModel export): the blocks run under it only.
"""

import os
import re
import textwrap

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[ \t]*$")

pytestmark = pytest.mark.tf_only


def python_blocks(path=README):
    """[(line of the first code line, 1-based; code)] of the fenced ```python blocks of ``path``."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match["lang"]:
            i += 1
            continue
        closing = re.compile(r"^[ \t]*```[ \t]*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        assert end is not None, f"README.md:{i + 1}: the ```{match['lang']} block is never closed"
        if match["lang"] in ("python", "py"):
            blocks.append((i + 2, textwrap.dedent("\n".join(lines[i + 1:end]))))
        i = end + 1
    return blocks


def _params():
    return [pytest.param(line, code, id=f"README.md:{line}", marks=[pytest.mark.slow] if ".fit(" in code else [])
            for line, code in python_blocks()]


def test_the_readme_has_python_blocks_and_shows_predict():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert any("mtl_keras.predict(" in code for _, code in blocks)


@pytest.mark.parametrize("line, code", _params())
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Blank lines in front: the compiled block's line numbers are the README's.
    compiled = compile("\n" * (line - 1) + code, README, "exec")
    exec(compiled, {"__name__": "__readme__"})  # noqa: S102 - the README's own examples
