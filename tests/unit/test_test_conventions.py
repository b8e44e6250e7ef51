"""The test suite's own rules (CONTRIBUTING.md "Writing tests"), checked on its source so a
new test file keeps them: tests/ is on sys.path through pyproject (no sys.path edits), an
environment that cannot run a test goes through support.ci (fails under CI, never a
silent skip), and an integration module that starts processes is out of the fast loop.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in TESTS.rglob("*.py")
                 if "support" not in p.relative_to(TESTS).parts and p != Path(__file__).resolve())
STARTS_PROCESSES = re.compile(r"relay_factory|RelayProcess\(|subprocess\.(run|Popen)|Farm\(")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(TESTS)) for p in paths]


@pytest.mark.parametrize("path", SOURCES, ids=_ids(SOURCES))
def test_no_sys_path_edits_and_no_bare_skips(path: Path) -> None:
    text = path.read_text()
    assert "sys.path.insert" not in text, "tests/ is on pytest's pythonpath: import directly"
    for bad in ('os.environ.get("CI"', "pytest.skip(", "mark.skipif("):
        assert bad not in text, f"{bad}: use support.ci.require / the root marker"


INTEGRATION = sorted((TESTS / "integration").glob("test_*.py"))


@pytest.mark.parametrize("path", INTEGRATION, ids=_ids(INTEGRATION))
def test_process_starting_modules_are_slow(path: Path) -> None:
    text = path.read_text()
    if STARTS_PROCESSES.search(text):
        assert "mark.slow" in text, \
            "starts authrelay serve, a CLI or a daemon: mark it @pytest.mark.slow"
