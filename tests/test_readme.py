"""The README's Python examples run as written (pydantic-core style)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(python_blocks()) >= 2


def test_readme_examples_run() -> None:
    # Each block in a fresh interpreter: the README's figures assume a fresh process.
    for block in python_blocks():
        r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"README example failed:\n{block}\n{r.stderr}"


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text().splitlines()[:6]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)
