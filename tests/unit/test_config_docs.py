"""Every config key is documented: README.md (Configuration and the feature sections) or
docs/LIMITS.md (every limit and timeout, with its default and what it bounds).

The key list is generated from the config dataclasses (reloadkeys.key_paths), so a key
added to config.py fails here until the docs name it (as tests/unit/test_reloadkeys.py
fails until reloadkeys.py says whether SIGHUP applies it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from authrelay import reloadkeys

ROOT = Path(__file__).resolve().parents[2]
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "docs/LIMITS.md")}


@pytest.mark.parametrize("path", reloadkeys.key_paths())
def test_every_key_is_documented(path: str) -> None:
    key = path.rsplit(".", 1)[-1].removesuffix("[]")
    word = re.compile(rf"(?<![\w-]){re.escape(key)}(?![\w-])")
    assert any(word.search(text) for text in DOCS.values()), \
        f"{path}: not in README.md nor docs/LIMITS.md"


def test_every_module_is_in_the_architecture_map() -> None:
    """ARCHITECTURE.md's module map names every module of the package, and no module that
    is gone."""
    arch = (ROOT / "ARCHITECTURE.md").read_text()
    src = ROOT / "src" / "authrelay"
    modules = {p.relative_to(src).as_posix() for p in src.rglob("*.py")
               if p.name != "__init__.py" or p.parent == src}
    mapped = set(re.findall(r"^\| `([\w/]+\.py)` \|", arch, re.M))
    assert modules - mapped == set(), "add to ARCHITECTURE.md's module map"
    assert mapped - modules == set(), "gone: remove from ARCHITECTURE.md's module map"
